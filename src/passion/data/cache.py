"""The preprocessed cache format (written by `passion prepare`, read by datasets and evaluation).

    CACHE/dataset.json              {"format": "passion-cache", "version": 1, "spec": {...},
                                     "cases": [{"name", "available": [bool per modality], "shape": [D,H,W]}],
                                     "min_size", "spacing": [mm x3], "orientation": "LPS", ...}
    CACHE/cases/<case>/image.npy    float32 [M, D, H, W], z-scored, zeros for missing modalities
    CACHE/cases/<case>/label.npy    uint8 [D, H, W] training classes (absent when the case has no labels)
    CACHE/cases/<case>/meta.json    {"name", "available", "original_shape", "affine" (4x4, of the raw file),
                                     "spacing" (of the cached grid), "orientation", "grid_shape",
                                     "grid": the dataset's {"spacing", "orientation"} it was prepared for,
                                     "crop_box": [[lo, hi], ...] (hi exclusive, on the cached grid), "files": {...}}

Caches from before spacing and orientation were recorded hold each case on its native grid;
`grid_of` returns None for them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils import PassionError, atomic_path, atomic_write_json
from .spec import DatasetSpec

FORMAT = "passion-cache"
VERSION = 1


@dataclass
class CachedCase:
    name: str
    image: np.ndarray  # [M, *spatial] float32
    label: np.ndarray | None  # [*spatial] uint8 training classes
    meta: dict

    @property
    def available(self) -> list[bool]:
        return [bool(v) for v in self.meta["available"]]


def case_dir(cache: str | Path, name: str) -> Path:
    return Path(cache) / "cases" / name


def is_case_complete(cache: str | Path, name: str) -> bool:
    """A case is finished when its meta.json exists (written last)."""
    return (case_dir(cache, name) / "meta.json").is_file()


def write_case(cache: str | Path, name: str, image: np.ndarray, label: np.ndarray | None, meta: dict) -> None:
    d = case_dir(cache, name)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "image.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, image.astype(np.float32, copy=False))
    if label is not None:
        with atomic_path(d / "label.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, label.astype(np.uint8, copy=False))
    atomic_write_json(d / "meta.json", meta)  # last: marks the case complete


def read_case(cache: str | Path, name: str, mmap: bool = False) -> CachedCase:
    d = case_dir(cache, name)
    if not (d / "meta.json").is_file():
        raise PassionError(f"case {name!r} is not in cache {cache} (run `passion prepare` first)")
    meta = json.loads((d / "meta.json").read_text())
    mode = "r" if mmap else None
    image = np.load(d / "image.npy", mmap_mode=mode)
    label = np.load(d / "label.npy", mmap_mode=mode) if (d / "label.npy").is_file() else None
    return CachedCase(name, image, label, meta)


def write_index(cache: str | Path, spec: DatasetSpec, cases: list[dict], extra: dict | None = None) -> None:
    index = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "cases": cases}
    index.update(extra or {})
    atomic_write_json(Path(cache) / "dataset.json", index)


def read_index(cache: str | Path) -> dict:
    p = Path(cache) / "dataset.json"
    if not p.is_file():
        raise PassionError(f"{cache}: no dataset.json; is this a cache made by `passion prepare`?")
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PassionError(f"{p}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise PassionError(f"{p}: not a passion cache index")
    return index


def read_spec(cache: str | Path) -> DatasetSpec:
    return DatasetSpec.from_dict(read_index(cache)["spec"])


def grid_of(index: dict) -> dict | None:
    """The training grid {"spacing", "orientation"} of a cache index, None for native-grid caches."""
    if index.get("spacing") is None or not index.get("orientation"):
        return None
    return {"spacing": [float(v) for v in index["spacing"]], "orientation": str(index["orientation"])}


def preprocess_record(index: dict) -> dict:
    """What `predict` must repeat of a cache's preprocessing; checkpoints store it as "preprocess"."""
    return {"min_size": index.get("min_size"), **(grid_of(index) or {"spacing": None, "orientation": None})}


def match_cache_names(names: list[str], cache: str | Path) -> list[str]:
    """Cache names for a case list; the reference lists prefix BraTS names with HG_/LG_."""
    out, missing = [], []
    for n in names:
        if is_case_complete(cache, n):
            out.append(n)
        elif n[:3] in ("HG_", "LG_") and is_case_complete(cache, n[3:]):
            out.append(n[3:])
        else:
            missing.append(n)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PassionError(f"case(s) {', '.join(missing[:3])}{more} are not in cache {cache}")
    return out
