"""The method registry: name -> Method class (each carries its config class)."""

from __future__ import annotations

from rankdown.config import ConfigError, MethodConfig
from rankdown.methods.asvd import ASVD
from rankdown.methods.base import Method
from rankdown.methods.lillama import Lillama
from rankdown.methods.modegpt import ModeGPT
from rankdown.methods.rom import ROM
from rankdown.methods.svd import SVD
from rankdown.methods.svd_llm import SVDLLM

METHODS: dict[str, type[Method]] = {cls.config_class.method: cls for cls in (SVD, ASVD, SVDLLM, ROM, Lillama, ModeGPT)}


def method_names() -> list[str]:
    return list(METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def make_config(name: str, **settings) -> MethodConfig:
    """The config of method ``name`` with ``settings``; unknown settings raise :class:`ConfigError`."""
    return method_class(name).config_class.from_dict(settings)


__all__ = ["METHODS", "Method", "method_class", "method_names", "make_config"]
