"""Tokenize a corpus into train.bin / val.bin for pretraining.

    python scripts/prepare_openwebtext.py                                      # OpenWebText (needs internet)
    python scripts/prepare_openwebtext.py --source bundled --output_dir data/prepared/bundled --train_tokenizer 4096
    python scripts/prepare_openwebtext.py --source my_corpus/ --output_dir data/prepared/mine   # .txt/.jsonl/.parquet
"""

from lit_gpt.data.prepare import prepare
from lit_gpt.utils import run_cli

if __name__ == "__main__":
    run_cli(prepare)
