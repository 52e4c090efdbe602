"""The remote code of a transformers model with SSA (lit_gpt.hf_ssa.save_pretrained): each family's own model class
with the temperatures that config.json's `lit_gpt_ssa` describes, so that a saved Llama with SSA loads as a Llama with
SSA (`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`), without this project installed."""

from pathlib import Path

import transformers

from lit_gpt.config import Config, stored_slope_form
from lit_gpt.hf_ssa import CONFIG_KEY, TEMPERATURE_MODULES, attach


def with_ssa(base: type) -> type:
    """`base` (LlamaForCausalLM, ...) whose constructor adds the temperatures; they stay float32 when the rest is
    loaded in bf16."""

    def __init__(self, config) -> None:
        base.__init__(self, config)
        attach(self, Config.from_dict(dict(getattr(config, CONFIG_KEY))))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As the family's, refusing a config.json whose ssa_slope_form differs from the form the weights store the
        slopes in (an export of ours records it)."""
        model = base.from_pretrained.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)
        folder = Path(str(pretrained_model_name_or_path))
        model.ssa_config.check_stored_slope_form(stored_slope_form(folder / "model.safetensors"),
                                                 f"{folder}/config.json")
        return model

    return type(base.__name__.replace("ForCausalLM", "SSAForCausalLM"), (base,),
                {"__init__": __init__, "from_pretrained": from_pretrained,
                 "_keep_in_fp32_modules": list(TEMPERATURE_MODULES), "__module__": __name__})


LlamaSSAForCausalLM = with_ssa(transformers.LlamaForCausalLM)
MistralSSAForCausalLM = with_ssa(transformers.MistralForCausalLM)
Qwen2SSAForCausalLM = with_ssa(transformers.Qwen2ForCausalLM)
Qwen3SSAForCausalLM = with_ssa(transformers.Qwen3ForCausalLM)
