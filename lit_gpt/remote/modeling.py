"""The Hugging Face wrapper around `GPT`: `LitGPTSSAForCausalLM` for `AutoModelForCausalLM`, with `generate()`
decoding through the model's own KV cache at absolute positions and left-padded batches through `attention_mask`."""

from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lit_gpt.config import Config, stored_slope_form
from lit_gpt.model import GPT
from lit_gpt.remote.configuration import LitGPTSSAConfig

# transformers 5 names the cache that generate() carries `cache`, transformers 4 `past_key_values`
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class DecodingState:
    """How many slots of the model's own KV cache (held in its attention layers) are filled: the cache object that
    `generate()` carries from step to step."""

    def __init__(self) -> None:
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class LitGPTSSAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LitGPTSSAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: LitGPTSSAConfig) -> None:
        super().__init__(config)
        try:
            lit_config = Config.from_dict(dict(config.lit_config))
        except (ValueError, TypeError) as error:
            where = getattr(config, "_name_or_path", "") or "the model folder"
            raise ValueError(f"{where}/config.json, lit_config: {error}") from None
        self.model = GPT(lit_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As PreTrainedModel's, refusing a config.json whose ssa_slope_form differs from the form the weights store
        their slopes in (it would read other slopes from the same numbers)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = Path(str(pretrained_model_name_or_path))
        model.model.config.check_stored_slope_form(stored_slope_form(folder / "model.safetensors"),
                                                   f"{folder}/config.json")
        return model

    def _init_weights(self, module: torch.nn.Module) -> None:
        """GPT initialises its own weights; only the rotary tables (buffers, not in the weights file) are rebuilt."""
        if isinstance(module, GPT):
            module.reset_rope_cache(module.lm_head.weight.device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model keeps its own KV cache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        state = cache_state(kwargs)
        if state is not None:
            input_ids = input_ids[:, state.seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_NAME: state,
                "use_cache": kwargs.get("use_cache", True)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T); attention_mask (B, keys so far), 0 over padding (left padding: each row's real tokens
        are numbered from 0); with use_cache, the tokens go into the model's KV cache after those already there."""
        B, T = input_ids.shape
        state = cache_state(kwargs)
        if use_cache and state is None:
            self.model.set_kv_cache(batch_size=B, dtype=self.model.lm_head.weight.dtype)
            state = DecodingState()
        elif state is None:
            self.model.clear_kv_cache()
        start = state.seen if state is not None else 0
        slots = torch.arange(start, start + T, device=input_ids.device)
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, : start + T].all()):
            keys = attention_mask[:, : start + T].bool()
            if position_ids is None:
                position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            own_slot = slots.unsqueeze(-1) == torch.arange(start + T, device=input_ids.device)  # padding sees itself
            mask = (keys[:, None, None, :] | own_slot).expand(B, 1, T, start + T)
        logits = self.model(input_ids, input_pos=slots if state is not None else None, mask=mask,
                            position_ids=position_ids)
        if state is not None:
            state.seen += T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: state})


def cache_state(kwargs: dict) -> DecodingState | None:
    for key in ("cache", "past_key_values"):
        if isinstance(kwargs.get(key), DecodingState):
            return kwargs[key]
    return None
