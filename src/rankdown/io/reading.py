"""Reading a saved folder back: the model built in-process from its stock class and recorded
structure (its generated .py files are not run), and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankdown.io.record import ModelFolderError, _read_config, _wrapper_name
from rankdown.nn.portable import apply_structure


def _wrapper_class(stock: type) -> type:
    """The in-process twin of the generated class: the stock class plus ``apply_structure``."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        stock.__init__(self, config, *args, **kwargs)
        apply_structure(self, (getattr(config, "rankdown", None) or {}).get("structure"))

    # transformers picks the experts/attention implementation by reading the source of the class's
    # module (here rankdown/io/reading.py); make it ask the stock class, as the generated class does
    probes = {
        name: classmethod(lambda cls, _name=name: getattr(stock, _name)())
        for name in ("_can_set_experts_implementation", "_can_set_attn_implementation")
        if hasattr(stock, name)
    }
    return type(_wrapper_name(stock.__name__), (stock,), {**probes, "__init__": __init__, "__module__": __name__})


def _base_config(path: Path, cfg: dict, record: dict) -> tuple[type, Any]:
    """The stock model class and its config (with ``.rankdown``) of a rankdown folder's config.json."""
    import transformers

    try:
        base_type, base_arch = record["base_model_type"], record["base_architecture"]
        stock = getattr(transformers, base_arch)
    except (KeyError, AttributeError) as e:
        raise ModelFolderError(f"{path}/config.json names no usable base architecture ({e!r})") from e
    base = {k: v for k, v in cfg.items() if k not in ("rankdown", "auto_map")}
    base.update(model_type=base_type, architectures=[base_arch])
    config = stock.config_class.from_dict(base)
    config.rankdown = record
    return stock, config


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder, without running a rankdown folder's generated code.

    (A plain ``AutoTokenizer.from_pretrained`` reads config.json through ``AutoConfig``, which
    asks to trust the folder's remote code.)
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser().absolute()
    cfg = _read_config(path)
    record = cfg.get("rankdown")
    if record is None:
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, config=_base_config(path, cfg, record)[1])


def load(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a folder written by :func:`save` (or a plain HF model folder) in eval mode.

    rankdown folders are built in-process from the stock class and the recorded structure; their
    .py files are not executed. ``dtype=None`` keeps the saved dtype. The record stays reachable as
    ``model.config.rankdown``. (Built by :func:`rankdown.loading.folder_model`, the one builder of
    a folder's model, which streaming's skeleton comes from too.)
    """
    from rankdown.loading import folder_model

    return folder_model(path, dtype=dtype, device=device)
