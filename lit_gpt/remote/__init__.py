"""The Hugging Face remote-code model (`trust_remote_code=True`) that `scripts/convert_lit_checkpoint.py` writes for
a checkpoint with an attention temperature. `configuration.py` and `modeling.py` here are templates: the exporter
(lit_gpt/export.py) writes the configuration file as it is and generates the modeling file from lit_gpt/config.py,
lit_gpt/model.py and `modeling.py`, so the exported model runs this project's own code."""
