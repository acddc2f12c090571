"""The paper's training augmentation (random crop, small rotation, intensity jitter, flips) on CPU.

Every random number comes from the Generator passed in, and the same numbers are drawn whatever
the availability mask, so a patch depends only on (seed, epoch, index). Unavailable modalities
are never touched and stay exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

_ROTATION_PLANES = ((0, 1), (1, 2), (0, 2))


@dataclass(frozen=True)
class AugmentConfig:
    """Paper defaults: 10 degrees, scale and shift 0.1, flips on every axis."""

    rotate_degrees: float = 10.0
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    flip: bool = True


def _crop_and_pad(arr: np.ndarray, starts: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Crop the trailing spatial axes; pad with zeros (after the crop) where the volume is smaller."""
    spatial = arr.shape[-len(patch):]
    sl = tuple(slice(s, s + min(p, n)) for s, p, n in zip(starts, patch, spatial))
    out = np.asarray(arr[(Ellipsis,) + sl])
    pad = [(0, p - o) for p, o in zip(patch, out.shape[-len(patch):])]
    if any(after for _, after in pad):
        out = np.pad(out, [(0, 0)] * (out.ndim - len(patch)) + pad)
    return np.array(out, copy=True)


def centred_starts(spatial: Sequence[int], patch: Sequence[int], center: Sequence[int]) -> list[int]:
    """Patch origin that centres `center` in the patch, shifted back inside the volume."""
    return [int(np.clip(int(c) - p // 2, 0, max(n - p, 0))) for c, p, n in zip(center, patch, spatial)]


def random_crop(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int],
                rng: np.random.Generator,
                center: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Uniformly placed patch, or one centred on `center` (foreground oversampling); a volume
    smaller than the patch is zero-padded (at the end)."""
    spatial = image.shape[1:]
    if len(patch) != len(spatial):
        raise ValueError(f"patch {tuple(patch)} does not match volume {tuple(spatial)}")
    if center is not None:
        starts = centred_starts(spatial, patch, center)
    else:
        starts = [int(rng.integers(0, n - p + 1)) if n > p else 0 for n, p in zip(spatial, patch)]
    img = _crop_and_pad(image, starts, patch).astype(np.float32, copy=False)
    lab = _crop_and_pad(label, starts, patch) if label is not None else None
    return img, lab


def random_rotate(image: np.ndarray, label: np.ndarray | None, available: Sequence[bool],
                  max_degrees: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate in one random plane; linear for images, nearest for labels, zeros outside."""
    planes = _ROTATION_PLANES if image.ndim == 4 else ((0, 1),)  # 2D patches: the image plane
    plane = planes[int(rng.integers(0, len(planes)))]
    angle = float(rng.uniform(-max_degrees, max_degrees))
    if max_degrees <= 0 or angle == 0.0:
        return image, label
    out = np.zeros_like(image)
    for m, on in enumerate(available):
        if on:
            out[m] = ndimage.rotate(image[m], angle, axes=plane, reshape=False, order=1, mode="constant", cval=0.0)
    if label is not None:
        label = ndimage.rotate(label, angle, axes=plane, reshape=False, order=0, mode="constant", cval=0)
    return out, label


def random_intensity(image: np.ndarray, available: Sequence[bool], scale: float, shift: float,
                     rng: np.random.Generator) -> np.ndarray:
    """x * (1 + U(-scale, scale)) + U(-shift, shift) per available modality."""
    m = image.shape[0]
    factors = 1.0 + rng.uniform(-scale, scale, size=m)
    offsets = rng.uniform(-shift, shift, size=m)
    for i, on in enumerate(available):
        if on:
            image[i] = image[i] * np.float32(factors[i]) + np.float32(offsets[i])
    return image


def random_flip(image: np.ndarray, label: np.ndarray | None,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip each spatial axis with probability 1/2."""
    flips = rng.random(image.ndim - 1) < 0.5
    for axis, do in enumerate(flips):
        if do:
            image = np.flip(image, axis=axis + 1)
            if label is not None:
                label = np.flip(label, axis=axis)
    image = np.ascontiguousarray(image)
    label = np.ascontiguousarray(label) if label is not None else None
    return image, label


def augment_patch(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int],
                  available: Sequence[bool], rng: np.random.Generator,
                  config: AugmentConfig | None = AugmentConfig(),
                  center: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop to `patch` (centred on `center` when given), then (if `config`) rotate, jitter
    intensities and flip.

    `config=None` gives the crop only. Unavailable channels are zero on return.
    """
    available = [bool(v) for v in available]
    img, lab = random_crop(image, label, patch, rng, center)
    for m, on in enumerate(available):
        if not on:
            img[m] = 0.0
    if config is not None:
        img, lab = random_rotate(img, lab, available, config.rotate_degrees, rng)
        img = random_intensity(img, available, config.intensity_scale, config.intensity_shift, rng)
        if config.flip:
            img, lab = random_flip(img, lab, rng)
    return img, lab
