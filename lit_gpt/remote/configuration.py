"""The configuration of an exported lit-gpt-ssa model: this project's model config, kept whole under `lit_config`,
with the standard Hugging Face fields derived from it."""

from transformers import PretrainedConfig


class LitGPTSSAConfig(PretrainedConfig):
    model_type = "lit_gpt_ssa"

    def __init__(self, lit_config: dict | None = None, **kwargs) -> None:
        self.lit_config = dict(lit_config or {})
        values = self.lit_config
        for hf_name, ours in (("vocab_size", "padded_vocab_size"), ("hidden_size", "n_embd"),
                              ("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"),
                              ("num_key_value_heads", "n_query_groups"), ("max_position_embeddings", "block_size")):
            if ours in values:
                kwargs.setdefault(hf_name, values[ours])
        kwargs["tie_word_embeddings"] = False  # the model ties its own output layer where its config says so
        super().__init__(**kwargs)
