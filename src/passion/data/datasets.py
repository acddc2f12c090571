"""Torch datasets over the preprocessed cache: training patches per setting, full evaluation volumes.

Randomness of a training item is a pure function of (seed, epoch, index): the dataset never
uses worker or global RNG state, so any `num_workers` gives the same patches and a resumed run
can replay an epoch by calling `set_epoch(epoch)` before iterating. With DataLoader workers,
keep `persistent_workers=False` (the default) so every epoch's workers see the new epoch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import SETTINGS
from ..utils import PassionError
from .augment import AugmentConfig, augment_patch
from .cache import read_case, read_index
from .spec import DatasetSpec, Mask


def _cache_availability(cache: str | Path, spec: DatasetSpec) -> dict[str, Mask]:
    index = read_index(cache)
    return {c["name"]: tuple(bool(v) for v in c.get("available", [True] * spec.num_modalities))
            for c in index.get("cases", [])}


def _check_names(cache: str | Path, names: Sequence[str], known: Mapping[str, Mask]) -> None:
    if not names:
        raise PassionError("no cases given to the dataset")
    for n in names:
        if n not in known:
            raise PassionError(f"case {n!r} is not in cache {cache} (run `passion prepare` first)")


def _sub_subsets(mask: Mask, spec: DatasetSpec) -> list[Mask]:
    """Non-empty subsets of `mask`, in the reference order."""
    return [s for s in spec.subsets() if all(mask[m] or not on for m, on in enumerate(s))]


def effective_mask(split_mask: Sequence[bool] | None, available: Sequence[bool]) -> Mask:
    """A modality is usable only if the split keeps it AND its file exists; never empty."""
    avail = tuple(bool(v) for v in available)
    if split_mask is None:
        return avail
    both = tuple(bool(a) and b for a, b in zip(split_mask, avail))
    return both if any(both) else avail


def availability_counts(masks: Mapping[str, Sequence[bool]] | Sequence[Sequence[bool]],
                        setting: str = "idt", require_all: bool = False,
                        modalities: Sequence[str] | None = None) -> list[int]:
    """n[m] = number of training cases having modality m (pdt: every case has every modality).

    `require_all` turns n[m] == 0 into a PassionError (the inverse weight N/n[m] would divide by zero).
    """
    rows = list(masks.values()) if isinstance(masks, Mapping) else list(masks)
    if not rows:
        raise PassionError("no training masks to count modalities in")
    num = len(rows[0])
    if setting == "pdt":
        counts = [len(rows)] * num
    else:
        counts = [sum(bool(r[m]) for r in rows) for m in range(num)]
    if require_all:
        for m, c in enumerate(counts):
            if c == 0:
                name = modalities[m] if modalities else f"#{m}"
                raise PassionError(f"modality {name} is present in no training case; cannot weight it by 1/n")
    return counts


# Foreground voxels remembered per case and class for oversampling (a subsample is plenty).
_MAX_LOCATIONS = 10_000


def class_locations(label: np.ndarray, seed: int = 0) -> dict[int, np.ndarray]:
    """{class: [K, ndim] voxel coordinates} of every foreground class, at most _MAX_LOCATIONS each."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(label):
        if c == 0:
            continue
        coords = np.argwhere(label == c)
        if len(coords) > _MAX_LOCATIONS:
            coords = coords[np.sort(rng.choice(len(coords), _MAX_LOCATIONS, replace=False))]
        out[int(c)] = coords
    return out


class TrainDataset(Dataset):
    """Random patches with their modality mask for the idt / idt_drop / pdt settings.

    A fraction `foreground_fraction` of the patches is centred on a foreground voxel (a class
    drawn uniformly among those the case has, then a voxel of it), as nnU-Net oversamples a
    third of its patches; the others are placed uniformly. Small lesions in large volumes are
    otherwise rarely seen, and every patch without them teaches only "background".

    In pdt (complete data) the encoders see every modality: the drawn subset is returned as
    `mask` for the fused teacher, but no image channel is zeroed (METHOD.md section 5).

    For 2D datasets (spec.spatial_dims == 2) an item is a random slice of the subject, cropped to
    a 2D patch: [M, h, w]; a subject (not a slice) is the unit of the split and of an epoch."""

    def __init__(self, cache: str | Path, case_names: Sequence[str],
                 masks: Mapping[str, Sequence[bool]] | Sequence[Sequence[bool]] | None = None,
                 setting: str = "idt", patch_size: Sequence[int] = (80, 80, 80), augment: bool = True,
                 seed: int = 1037, spec: DatasetSpec | None = None,
                 augment_config: AugmentConfig | None = None, foreground_fraction: float = 0.0) -> None:
        if setting not in SETTINGS:
            raise PassionError(f"unknown training setting {setting!r}; expected one of {', '.join(SETTINGS)}")
        from .cache import read_spec

        self.cache = Path(cache)
        self.spec = spec or read_spec(cache)
        self.names = list(case_names)
        self.setting = setting
        self.patch_size = tuple(int(p) for p in patch_size)
        self.augment_config = (augment_config or AugmentConfig()) if augment else None
        self.seed = int(seed)
        self.epoch = 0
        if not 0.0 <= float(foreground_fraction) <= 1.0:
            raise PassionError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.foreground_fraction = float(foreground_fraction)
        self._locations: dict[str, dict[int, np.ndarray]] = {}
        genuine = _cache_availability(cache, self.spec)
        _check_names(cache, self.names, genuine)
        if setting == "pdt":
            incomplete = [n for n in self.names if not all(genuine[n])]
            if incomplete:
                raise PassionError(f"data.setting=pdt trains on complete cases, but {incomplete[0]!r} "
                                   f"({len(incomplete)} cases in all) lacks a modality file; use idt or idt_drop")
        split_masks = self._split_masks(masks)
        self.masks: list[Mask] = [effective_mask(split_masks[i], genuine[n]) for i, n in enumerate(self.names)]
        self._choices = [_sub_subsets(m, self.spec) for m in self.masks]

    def _split_masks(self, masks) -> list[Mask | None]:
        """pdt ignores split masks; None means 'whatever files exist' (no missing-rate table)."""
        if self.setting == "pdt" or masks is None:
            return [None] * len(self.names)
        if isinstance(masks, Mapping):
            absent = [n for n in self.names if n not in masks]
            if absent:
                raise PassionError(f"case {absent[0]!r} has no mask in the split ({len(absent)} cases without)")
            rows = [masks[n] for n in self.names]
        else:
            rows = list(masks)
            if len(rows) != len(self.names):
                raise PassionError(f"{len(rows)} masks for {len(self.names)} cases")
        for n, r in zip(self.names, rows):
            if len(r) != self.spec.num_modalities or not any(r):
                raise PassionError(f"case {n!r}: mask {list(r)} is not a non-empty subset of {self.spec.num_modalities} modalities")
        return [tuple(bool(v) for v in r) for r in rows]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws __getitem__ reproduces."""
        self.epoch = int(epoch)

    def availability_counts(self, require_all: bool = False) -> list[int]:
        """n[m] over this dataset's effective masks (pdt: the full count)."""
        return availability_counts(self.masks, self.setting, require_all, self.spec.modalities)

    def __len__(self) -> int:
        return len(self.names)

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def draw_mask(self, index: int, rng: np.random.Generator) -> Mask:
        """idt: the fixed mask; idt_drop and pdt: a uniform non-empty subset of what is usable."""
        if self.setting == "idt":
            return self.masks[index]
        choices = self._choices[index]
        return choices[int(rng.integers(0, len(choices)))]

    def _foreground_voxel(self, index: int, label: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """With probability foreground_fraction a foreground voxel to centre the patch on, else None."""
        if self.foreground_fraction <= 0.0 or rng.random() >= self.foreground_fraction:
            return None
        name = self.names[index]
        if name not in self._locations:
            self._locations[name] = class_locations(np.asarray(label), seed=self.seed)
        locations = self._locations[name]
        if not locations:
            return None
        classes = sorted(locations)
        coords = locations[classes[int(rng.integers(0, len(classes)))]]
        return coords[int(rng.integers(0, len(coords)))]

    def __getitem__(self, index: int) -> dict:
        rng = self.rng_for(index)
        name = self.names[index]
        mask = self.draw_mask(index, rng)
        case = read_case(self.cache, name, mmap=True)
        if case.label is None:
            raise PassionError(f"case {name!r} in {self.cache} has no labels; it cannot be used for training")
        image, label = case.image, case.label
        center = self._foreground_voxel(index, label, rng)
        if self.spec.spatial_dims == 2 and image.ndim == 4:
            # 2D datasets store each subject as a slice stack [M, H, W, S]: one random slice per draw
            # (the foreground voxel's slice when one was drawn)
            z = int(rng.integers(0, image.shape[-1])) if center is None else int(center[-1])
            image, label = image[..., z], label[..., z]
            center = None if center is None else center[:-1]
        # pdt: every encoder sees its modality; only the fused teacher uses the drawn subset
        seen = self.masks[index] if self.setting == "pdt" else mask
        image, label = augment_patch(image, label, self.patch_size, seen, rng, self.augment_config, center)
        return {
            "image": torch.from_numpy(image.astype(np.float32, copy=False)),
            "target": torch.from_numpy(label.astype(np.int64)),
            "mask": torch.tensor(mask, dtype=torch.bool),
            "name": name,
            "mask_id": self.spec.subset_id(mask),
        }


class EvalDataset(Dataset):
    """Whole cropped volumes for sliding-window evaluation; use DataLoader(batch_size=None)."""

    def __init__(self, cache: str | Path, case_names: Sequence[str], spec: DatasetSpec | None = None) -> None:
        from .cache import read_spec

        self.cache = Path(cache)
        self.spec = spec or read_spec(cache)
        self.names = list(case_names)
        self.available = _cache_availability(cache, self.spec)
        _check_names(cache, self.names, self.available)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        case = read_case(self.cache, name)
        available = tuple(bool(v) for v in case.meta.get("available", self.available[name]))
        image = np.array(case.image, dtype=np.float32, copy=True)
        for m, on in enumerate(available):
            if not on:
                image[m] = 0.0
        label = torch.from_numpy(case.label.astype(np.int64)) if case.label is not None else None
        return {
            "image": torch.from_numpy(image),
            "label": label,
            "name": name,
            "available": torch.tensor(available, dtype=torch.bool),
            "meta": case.meta,
        }
