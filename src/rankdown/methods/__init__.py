"""The method registry: name -> Method class (each carries its config class).

Every module of this package is imported once; a module that defines a method marks its class
``@register`` (see :mod:`rankdown.methods.base`). Adding a method is adding a file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from rankdown.config import ConfigError, MethodConfig
from rankdown.methods.base import REGISTRY, Method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: dict[str, type[Method]] = dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def method_names() -> list[str]:
    return list(METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def config_class(name: str) -> type[MethodConfig]:
    """The config class of method ``name``."""
    return method_class(name).config_class


def make_config(name: str, **settings) -> MethodConfig:
    """The config of method ``name`` with ``settings``; unknown or invalid settings raise :class:`ConfigError`."""
    return method_class(name).config_class.from_dict(settings)


__all__ = ["METHODS", "Method", "config_class", "method_class", "method_names", "make_config"]
