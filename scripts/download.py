"""Download a model from the Hugging Face Hub and convert it into a checkpoint folder of ours.

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct

writes the Hugging Face files to checkpoints/hf/<repo_id> and the converted checkpoint to checkpoints/<repo_id>.
Safetensors weights are preferred; `.bin` files are fetched only when a repository has nothing else.
"""

import os
from pathlib import Path

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.utils import check_hub_reachable, run_cli

TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json", "vocab.json", "merges.txt"]


def download(
    repo_id: str,
    checkpoint_root: Path = Path("checkpoints"),
    access_token: str | None = None,
    model_name: str | None = None,
    dtype: str | None = None,
    convert: bool = True,
) -> Path:
    """Download `repo_id` and convert it.

    Args:
        repo_id: the Hugging Face repository, ORG/NAME.
        checkpoint_root: the Hugging Face files go to <root>/hf/<repo_id>, the converted folder to <root>/<repo_id>.
        access_token: for gated models; defaults to the HF_TOKEN environment variable.
        model_name: a preset name, checked against config.json; inferred when left out.
        dtype: float32, float16 or bfloat16 for the converted weights; defaults to the checkpoint's own.
        convert: convert after downloading.
    """
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        check_hub_reachable(repr(repo_id))
    except ConnectionError as error:
        raise ConnectionError(f"{error} Download on a connected machine, or convert a local folder with"
                              " scripts/convert_hf_checkpoint.py.") from None
    token = access_token or os.environ.get("HF_TOKEN")
    hf_dir = Path(checkpoint_root) / "hf" / repo_id
    try:
        files = list_repo_files(repo_id, token=token)
        weights = ["*.safetensors", "*.safetensors.index.json"]
        if not any(f.endswith(".safetensors") for f in files):
            weights = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        snapshot_download(repo_id, local_dir=hf_dir, token=token,
                          allow_patterns=["config.json", *weights, *TOKENIZER_PATTERNS])
    except Exception as error:  # the hub client raises many types; the user needs the one line below
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConnectionError(
            f"Could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {first[:200]})."
            " Check the network, the repository name and access_token, or convert a local folder with"
            " scripts/convert_hf_checkpoint.py."
        ) from None
    if not convert:
        return hf_dir
    return convert_hf_checkpoint(hf_dir, Path(checkpoint_root) / repo_id, model_name=model_name, dtype=dtype)


if __name__ == "__main__":
    run_cli(download)
