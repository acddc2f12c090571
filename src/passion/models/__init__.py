"""Backbone registry: ``build_model(name, **cfg)`` and ``list_models()``.

A backbone is added by writing one module that decorates its class with
``@register_model("name")`` and importing that module in ``_BUILTIN`` below.
"""
from __future__ import annotations

import importlib
import inspect

from .interface import Backbone, Features, FusedOutput

_REGISTRY: dict[str, type[Backbone]] = {}
_BUILTIN = ("rfnet", "mmformer", "m2ftrans")


def register_model(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a backbone module not written yet
            if exc.name != f"{__name__}.{mod}":
                raise


def list_models() -> list[str]:
    """Registered backbone names; names starting with '_' (test-only registrations) are hidden."""
    _load_builtins()
    return sorted(n for n in _REGISTRY if not n.startswith("_"))


def build_model(name: str, **cfg) -> Backbone:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in cfg if k not in params and not accepts_any]
    if unknown:
        raise ValueError(f"model {name!r} does not take option(s) {', '.join(unknown)}")
    return cls(**cfg)


__all__ = ["Backbone", "Features", "FusedOutput", "build_model", "list_models", "register_model"]
