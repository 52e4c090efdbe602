"""The remote code of a transformers model with SSA (lit_gpt.hf_ssa.save_pretrained): each family's own model class
with the temperatures that config.json's `lit_gpt_ssa` describes, so that a saved Llama with SSA loads as a Llama with
SSA (`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`), without this project installed."""

from pathlib import Path

import transformers

from lit_gpt.config import Config, stored_slope_form
from lit_gpt.hf_ssa import CONFIG_KEY, TEMPERATURE_MODULES, attach

# what stays float32 in a half-precision model: the temperatures and the attention's gate (named with its parent, as
# transformers matches these as patterns and a bare "gate" would take the MLP's gate_proj along)
KEEP_IN_FLOAT32 = [*TEMPERATURE_MODULES, "self_attn.gate", "attention.gate"]


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

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """The family's answer: transformers reads it from the source of the class's module, and this file's (our
        model's attention, which takes no attention function) would say no, leaving selective attention unset."""
        return base._can_set_attn_implementation()

    name = base.__name__.replace("ForCausalLM", "SSAForCausalLM").replace("LMHeadModel", "SSALMHeadModel")
    share_weight_renaming(base, name)
    return type(name, (base,), {"__init__": __init__, "from_pretrained": from_pretrained,
                                "_can_set_attn_implementation": _can_set_attn_implementation,
                                "_keep_in_fp32_modules": KEEP_IN_FLOAT32, "__module__": __name__})


def share_weight_renaming(base: type, name: str) -> None:
    """transformers renames some families' tensors between the file and the model (GPT-NeoX's file says embed_out for
    lm_head), looked up by class name or model type, and never for remote code unless registered: the class with SSA
    registers its family's renaming under its own name, or it would load GPT-NeoX without its output layer."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers before 5 renames nothing this way
        return
    mapping = get_checkpoint_conversion_mapping(base.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(base.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


LlamaSSAForCausalLM = with_ssa(transformers.LlamaForCausalLM)
MistralSSAForCausalLM = with_ssa(transformers.MistralForCausalLM)
Qwen2SSAForCausalLM = with_ssa(transformers.Qwen2ForCausalLM)
Qwen3SSAForCausalLM = with_ssa(transformers.Qwen3ForCausalLM)
GPTNeoXSSAForCausalLM = with_ssa(transformers.GPTNeoXForCausalLM)
GPT2SSALMHeadModel = with_ssa(transformers.GPT2LMHeadModel)
