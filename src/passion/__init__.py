"""passion: PASSION (Preference-Aware Self-diStillatION) for incomplete multi-modal segmentation."""
__version__ = "0.1.0"

_LAZY = {
    "evaluate": ("passion.engine.evaluate", "evaluate"),
    "predict": ("passion.engine.predict", "predict"),
}


def __getattr__(name: str):
    """Import the heavy API functions (torch, MONAI) only when first used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'passion' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
