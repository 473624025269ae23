"""The embedded reference model: a small Llama (GQA, tied embeddings) trained on Python's stdlib.

Made by ``scripts/train_reference.py``; shipped as package data with its tokenizer, a held-out
text (``reference-heldout``) and a calibration text (``reference``), both files the model never
trained on.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch


def reference_dir() -> Path:
    return Path(str(files("rankdown") / "reference"))


def load_reference(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the reference model, in eval mode, in ``dtype`` (stored as float16)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = reference_dir()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"the reference model is missing from {path}; reinstall rankdown")
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
