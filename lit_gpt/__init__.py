"""Lit-GPT with Selective Self-Attention: GPT-2, Pythia and Llama-family models whose attention carries SSA."""

from lit_gpt.config import Config
from lit_gpt.model import GPT

__all__ = ["GPT", "Config"]
