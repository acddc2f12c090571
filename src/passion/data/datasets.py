"""Torch datasets over the preprocessed cache: training patches per setting, full evaluation volumes.

Randomness of a training item is a pure function of (seed, epoch, index): the dataset never
uses worker or global RNG state, so any `num_workers` gives the same patches and a resumed run
can replay an epoch by calling `set_epoch(epoch)` before iterating. With DataLoader workers,
keep `persistent_workers=False` (the default) so every epoch's workers see the new epoch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils import PassionError
from .augment import AugmentConfig, augment_patch
from .availability import (  # noqa: F401  (availability_counts, effective_mask: re-exported)
    MaskRows, TrainingAvailability, availability_counts, cache_availability, check_cases_in_cache, check_setting,
    drop_choices, effective_mask, split_mask_rows, training_availability)
from .cache import read_case
from .spec import DatasetSpec, Mask


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
                 masks: TrainingAvailability | MaskRows | None = None,
                 setting: str = "idt", patch_size: Sequence[int] = (80, 80, 80), augment: bool = True,
                 seed: int = 1037, spec: DatasetSpec | None = None,
                 augment_config: AugmentConfig | None = None, foreground_fraction: float = 0.0) -> None:
        from .cache import read_spec

        check_setting(setting)
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
        self.availability = self._resolve(masks)
        self.masks: list[Mask] = list(self.availability.masks)
        self._choices = [drop_choices(m, self.spec) for m in self.masks]

    def _resolve(self, masks: TrainingAvailability | MaskRows | None) -> TrainingAvailability:
        """Each case's mask (data/availability.py); the trainer passes it resolved, so the cache
        index is not read a second time. pdt ignores split masks; None means 'whatever files exist'."""
        if isinstance(masks, TrainingAvailability):
            if masks.names != tuple(self.names) or masks.setting != self.setting:
                raise PassionError(f"the availability given is for {masks.setting} and {len(masks.names)} cases, "
                                   f"not for {self.setting} and these {len(self.names)}")
            return masks
        genuine = cache_availability(self.cache, self.spec)
        check_cases_in_cache(self.cache, self.names, genuine)
        rows = None
        if self.setting != "pdt" and masks is not None:
            rows = split_mask_rows(self.names, masks, self.spec.num_modalities)
        return training_availability(genuine, self.names, rows, self.setting, self.spec.modalities)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws __getitem__ reproduces."""
        self.epoch = int(epoch)

    def availability_counts(self, require_all: bool = False) -> list[int]:
        """n[m] over this dataset's effective masks (pdt: the full count)."""
        return self.availability.counts(require_all)

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
        self.available = cache_availability(cache, self.spec)
        check_cases_in_cache(cache, self.names, self.available)

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
