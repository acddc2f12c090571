"""Voxel grids: spacing, orientation, and moving arrays between grids.

A grid is a spatial shape and a 4x4 voxel-to-world affine (NIfTI, mm). `prepare` brings every case
onto the training grid (one orientation, one spacing) and `predict` brings each input onto it and the
prediction back, so a structure lands at the same world position however the input is stored.

Resampling keeps the field of view: voxel i of an axis resized from n to n' covers the same world
extent as before, its centre at input coordinate (i + 0.5) * n / n' - 0.5 (as nnU-Net and
scipy's grid_mode do). The resulting spacing is therefore the target spacing up to the rounding of n'.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod
from scipy import ndimage

from ..utils import PassionError

SPACING_RTOL = 1e-3  # spacings closer than this are equal: converters disagree in the last digits
MAX_ANISOTROPY = 50.0  # largest/smallest voxel size; beyond it a header is broken, not a thick-slice scan
_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def voxel_spacing(affine) -> tuple[float, float, float]:
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


def axis_codes(affine) -> str:
    """Where each array axis points in world space, e.g. 'LPS' (nibabel's convention, RAS+ world)."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def check_affine(affine, where: str) -> None:
    """Refuse affines that no grid can be built from (one line naming `where`)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise PassionError(f"{where}: the affine is not a finite 4x4 matrix")
    sp = np.array(voxel_spacing(a))
    if sp.min() <= 1e-6:
        raise PassionError(f"{where}: degenerate affine (voxel size {_fmt(sp)} mm has a zero axis)")
    # |det| over the product of the column lengths is 1 for orthogonal axes and 0 for collinear ones
    if abs(np.linalg.det(a[:3, :3])) / sp.prod() < 1e-3:
        raise PassionError(f"{where}: degenerate affine (its voxel axes are collinear)")
    if sp.max() / sp.min() > MAX_ANISOTROPY:
        raise PassionError(f"{where}: voxel size {_fmt(sp)} mm is anisotropic beyond {MAX_ANISOTROPY:g}:1; "
                           "the header's spacing is probably wrong")


def _fmt(values) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=SPACING_RTOL, atol=0))


def same_grid(shape, affine, ref_shape, ref_affine, atol: float) -> bool:
    return (tuple(int(s) for s in shape) == tuple(int(s) for s in ref_shape)
            and bool(np.allclose(affine, ref_affine, atol=atol, rtol=0)))


def resample_to_grid(data: np.ndarray, affine, ref_shape, ref_affine, order: int = 1) -> np.ndarray:
    """A volume on another grid, sampled at the voxel centres of the reference grid (zero outside)."""
    m = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(ref_affine, np.float64)
    out = ndimage.affine_transform(np.asarray(data, np.float32), m[:3, :3], offset=m[:3, 3],
                                   output_shape=tuple(int(s) for s in ref_shape), order=order,
                                   mode="constant", cval=0.0)
    return out.astype(np.float32, copy=False)


def majority_orientation(affines: Sequence) -> str:
    """The most common axis codes of a dataset (ties: the first seen), the cache's orientation."""
    codes = [axis_codes(a) for a in affines]
    if not codes:
        raise PassionError("no readable image to take the orientation from")
    return Counter(codes).most_common(1)[0][0]


def median_spacing(spacings: Sequence[Sequence[float]]) -> list[float]:
    if not len(spacings):
        raise PassionError("no readable image to take the spacing from")
    return [float(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0)]


def check_codes(codes: str) -> str:
    codes = str(codes).upper()
    try:
        ornt_mod.axcodes2ornt(tuple(codes))
        ok = len(codes) == 3
    except Exception:  # nibabel raises ValueError or KeyError for bad codes
        ok = False
    if not ok:
        raise PassionError(f"orientation {codes!r} is not three axis codes such as RAS or LPS")
    return codes


def _zoom(array: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    """Field-of-view preserving resize of a [*spatial] array (see the module docstring)."""
    factors = np.array([n / m for n, m in zip(array.shape, out_shape)], dtype=np.float64)
    return ndimage.affine_transform(array, factors, offset=0.5 * factors - 0.5, output_shape=tuple(out_shape),
                                    order=order, mode="nearest", output=np.float32)


@dataclass
class GridMap:
    """How one case's stored grid maps onto the training grid (orientation, then spacing) and back."""

    native_shape: tuple[int, ...]
    native_affine: np.ndarray
    forward: np.ndarray  # nibabel ornt: native array -> training orientation
    backward: np.ndarray  # its inverse
    oriented_shape: tuple[int, ...]
    shape: tuple[int, ...]  # training grid
    affine: np.ndarray  # training grid

    @property
    def reoriented(self) -> bool:
        return not np.array_equal(self.forward, _IDENTITY)

    @property
    def resampled(self) -> bool:
        return self.shape != self.oriented_shape

    @property
    def identity(self) -> bool:
        return not (self.reoriented or self.resampled)

    @property
    def spacing(self) -> list[float]:
        return list(voxel_spacing(self.affine))

    @property
    def orientation(self) -> str:
        return axis_codes(self.affine)

    def _orient(self, array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
        if np.array_equal(ornt, _IDENTITY):
            return array
        if array.ndim == 3:
            return np.ascontiguousarray(ornt_mod.apply_orientation(array, ornt))
        moved = ornt_mod.apply_orientation(np.moveaxis(array, 0, -1), ornt)  # channels stay in front
        return np.ascontiguousarray(np.moveaxis(moved, -1, 0))

    def images(self, images: np.ndarray) -> np.ndarray:
        """[C, *native] -> [C, *training grid], linear interpolation."""
        out = self._orient(np.asarray(images, np.float32), self.forward)
        if self.resampled:
            out = np.stack([_zoom(c, self.shape, order=1) for c in out])
        return out

    def labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """[*native] class indices -> [*training grid]: one-hot linear, then the most likely class
        (nearest neighbour would let thin structures vanish or grow a voxel at random)."""
        out = self._orient(np.asarray(labels), self.forward)
        if not self.resampled:
            return out.astype(np.uint8, copy=False)
        best = np.full(self.shape, -1.0, dtype=np.float32)
        result = np.zeros(self.shape, dtype=np.uint8)
        for c in range(num_classes):
            if not (out == c).any():
                continue
            p = _zoom((out == c).astype(np.float32), self.shape, order=1)
            better = p > best
            result[better], best[better] = c, p[better]
        return result

    def back(self, probs: np.ndarray) -> np.ndarray:
        """[C, *training grid] probabilities -> [C, *native], linear interpolation."""
        out = np.asarray(probs, np.float32)
        if self.resampled:
            out = np.stack([_zoom(c, self.oriented_shape, order=1) for c in out])
        return self._orient(out, self.backward)

    def back_labels(self, classes: np.ndarray) -> np.ndarray:
        """[*training grid] classes -> [*native]; only exact when nothing was resampled."""
        if self.resampled:
            raise ValueError("class maps cannot be resampled back exactly; resample probabilities")
        return self._orient(np.asarray(classes), self.backward)


def grid_map(shape: Sequence[int], affine, spacing: Sequence[float] | None = None,
             orientation: str | None = None, keep_last_axis: bool = False) -> GridMap:
    """The map of a grid onto (orientation, spacing); None keeps the stored one (old caches and
    checkpoints). keep_last_axis: 2D datasets never resample across slices."""
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    if orientation:
        forward = ornt_mod.ornt_transform(ornt_mod.io_orientation(affine), ornt_mod.axcodes2ornt(tuple(orientation)))
        backward = ornt_mod.ornt_transform(ornt_mod.axcodes2ornt(tuple(orientation)), ornt_mod.io_orientation(affine))
    else:
        forward = backward = _IDENTITY.copy()
    oriented_affine = affine @ ornt_mod.inv_ornt_aff(forward, shape)
    oriented_shape = tuple(shape[int(i)] for i in np.argsort(forward[:, 0]))
    out_shape = oriented_shape
    if spacing is not None:
        current = voxel_spacing(oriented_affine)
        target = [float(s) for s in spacing]
        if keep_last_axis:
            target[-1] = current[-1]
        if not same_spacing(current, target):
            out_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(oriented_shape, current, target))
    factors = np.array([n / m for n, m in zip(oriented_shape, out_shape)], dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = 0.5 * factors - 0.5
    return GridMap(shape, affine, forward, backward, oriented_shape, out_shape, oriented_affine @ scale)


def plan_grid(grids: Sequence[tuple[Sequence[int], np.ndarray]], spacing: Sequence[float] | None = None,
              orientation: str | None = None) -> dict:
    """The training grid of a dataset from its cases' (shape, affine): the given orientation or the
    most common one, and the given spacing or the median spacing in that orientation (nnU-Net's default)."""
    orientation = check_codes(orientation) if orientation else majority_orientation([a for _, a in grids])
    if spacing is None:
        spacing = median_spacing([grid_map(s, a, None, orientation).spacing for s, a in grids])
    spacing = [float(v) for v in spacing]
    if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise PassionError(f"spacing {spacing} must be three positive numbers (mm)")
    return {"spacing": spacing, "orientation": orientation}
