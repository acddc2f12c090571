"""Crop + z-score preprocessing into the cache, and its exact inverse for predictions.

The pure functions here are shared by `passion prepare` and `passion predict`, so that a
prediction can be put back into the original geometry voxel for voxel.
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from ..utils import PassionError, progress
from . import cache as cache_mod
from . import layouts
from .geometry import grid_map, plan_grid, same_spacing
from .nifti import CaseFiles
from .spec import DatasetSpec

CropBox = list[list[int]]


def _as_sizes(min_size: int | Sequence[int], ndim: int) -> list[int]:
    if isinstance(min_size, (int, np.integer)):
        return [int(min_size)] * ndim
    sizes = [int(s) for s in min_size]
    if len(sizes) != ndim:
        raise PassionError(f"min_size needs {ndim} values, got {len(sizes)}")
    return sizes


def nonzero_bbox(volume_stack: np.ndarray, min_size: int | Sequence[int] = 128) -> CropBox:
    """Bounding box of voxels non-zero in any channel, grown to `min_size` where the volume allows.

    `volume_stack` is [M, *spatial] (or [*spatial]); the box is [[lo, hi], ...] with hi exclusive.
    Growth is symmetric and shifted back inside the volume, so the box is min(max(size, min), n).
    """
    stack = np.asarray(volume_stack)
    spatial = (stack != 0) if stack.ndim == 3 else np.any(stack != 0, axis=0)
    if not spatial.any():
        raise PassionError("the image has no non-zero voxel")
    sizes = _as_sizes(min_size, spatial.ndim)
    box: CropBox = []
    for axis, n in enumerate(spatial.shape):
        other = tuple(a for a in range(spatial.ndim) if a != axis)
        idx = np.flatnonzero(spatial.any(axis=other))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        box.append(_grow(lo, hi, sizes[axis], n))
    return box


def _grow(lo: int, hi: int, size: int, n: int) -> list[int]:
    missing = size - (hi - lo)
    if missing > 0:
        lo -= missing // 2
        hi += missing - missing // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > n:
        lo, hi = lo - (hi - n), n
    return [max(lo, 0), hi]


def crop(array: np.ndarray, crop_box: CropBox) -> np.ndarray:
    """Crop the trailing len(crop_box) axes (works for [*spatial] and [C, *spatial])."""
    lead = (slice(None),) * (array.ndim - len(crop_box))
    return array[lead + tuple(slice(lo, hi) for lo, hi in crop_box)]


def uncrop(array: np.ndarray, crop_box: CropBox, original_shape: Sequence[int], fill=0) -> np.ndarray:
    """Place a cropped array back into the original spatial shape (inverse of `crop`)."""
    k = len(crop_box)
    expected = tuple(hi - lo for lo, hi in crop_box)
    if tuple(array.shape[-k:]) != expected:
        raise PassionError(f"array of spatial shape {tuple(array.shape[-k:])} does not match crop box {crop_box}")
    if any(lo < 0 or hi > n for (lo, hi), n in zip(crop_box, original_shape)):
        raise PassionError(f"crop box {crop_box} lies outside shape {tuple(original_shape)}")
    out = np.full(array.shape[:-k] + tuple(int(s) for s in original_shape), fill, dtype=array.dtype)
    lead = (slice(None),) * (array.ndim - k)
    out[lead + tuple(slice(lo, hi) for lo, hi in crop_box)] = array
    return out


def center_box(shape: Sequence[int], crop_size: Sequence[int]) -> CropBox:
    """Centre crop of the leading len(crop_size) axes (lo < 0 or hi > n where the image is smaller
    and must be padded); the other axes (a 2D dataset's slices) are kept whole."""
    box: CropBox = []
    for axis, n in enumerate(shape):
        if axis < len(crop_size):
            lo = (int(n) - int(crop_size[axis])) // 2
            box.append([lo, lo + int(crop_size[axis])])
        else:
            box.append([0, int(n)])
    return box


def crop_pad(array: np.ndarray, crop_box: CropBox, fill=0) -> np.ndarray:
    """`crop` for boxes that may reach outside the array: the outside is `fill` (zero-padding)."""
    k = len(crop_box)
    spatial = array.shape[-k:]
    if all(lo >= 0 and hi <= n for (lo, hi), n in zip(crop_box, spatial)):
        return crop(array, crop_box)
    out = np.full(array.shape[:-k] + tuple(hi - lo for lo, hi in crop_box), fill, dtype=array.dtype)
    src, dst = [], []
    for (lo, hi), n in zip(crop_box, spatial):
        a, b = max(lo, 0), min(hi, n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    lead = (slice(None),) * (array.ndim - k)
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def uncrop_pad(array: np.ndarray, crop_box: CropBox, original_shape: Sequence[int], fill=0) -> np.ndarray:
    """Inverse of `crop_pad` (equals `uncrop` for boxes inside the original shape)."""
    k = len(crop_box)
    if all(lo >= 0 and hi <= n for (lo, hi), n in zip(crop_box, original_shape)):
        return uncrop(array, crop_box, original_shape, fill)
    expected = tuple(hi - lo for lo, hi in crop_box)
    if tuple(array.shape[-k:]) != expected:
        raise PassionError(f"array of spatial shape {tuple(array.shape[-k:])} does not match crop box {crop_box}")
    out = np.full(array.shape[:-k] + tuple(int(s) for s in original_shape), fill, dtype=array.dtype)
    src, dst = [], []
    for (lo, hi), n in zip(crop_box, original_shape):
        a, b = max(lo, 0), min(hi, int(n))
        dst.append(slice(a, max(a, b)))
        src.append(slice(a - lo, a - lo + max(0, b - a)))
    lead = (slice(None),) * (array.ndim - k)
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def zscore(volume: np.ndarray) -> np.ndarray:
    """z-score over the brain (non-zero) voxels; background stays exactly 0."""
    out = np.zeros(volume.shape, dtype=np.float32)
    brain = volume != 0
    if not brain.any():
        return out
    values = volume[brain].astype(np.float64)
    std = values.std()
    out[brain] = ((values - values.mean()) / (std if std > 1e-8 else 1.0)).astype(np.float32)
    return out


def preprocess_images(images: np.ndarray, available: Sequence[bool],
                      min_size: int | Sequence[int] = 128) -> tuple[np.ndarray, CropBox]:
    """Crop to the non-zero box of the available modalities and z-score each of them.

    Missing modalities come out as zeros whatever the input holds, so a model never sees them.
    """
    images = np.asarray(images)
    if images.shape[0] != len(available):
        raise PassionError(f"{images.shape[0]} image channels but {len(available)} availability flags")
    if not any(available):
        raise PassionError("no modality is available")
    present = np.array([bool(a) for a in available])
    box = nonzero_bbox(images[present], min_size)
    cropped = crop(images, box)
    out = np.zeros(cropped.shape, dtype=np.float32)
    for m, ok in enumerate(present):
        if ok:
            out[m] = zscore(cropped[m])
    return out, box


def preprocess_for_spec(images: np.ndarray, available: Sequence[bool], spec: DatasetSpec,
                        min_size: int | Sequence[int] = 128) -> tuple[np.ndarray, CropBox]:
    """The dataset's preprocessing: BraTS-like non-zero box + z-score, or, for a spec with
    `crop_size` (MyoPS), z-score per modality over the whole subject, then an in-plane centre
    crop zero-padded where the image is smaller (box entries then lie outside the image)."""
    if not spec.crop_size:
        return preprocess_images(images, available, min_size)
    images = np.asarray(images)
    if images.shape[0] != len(available):
        raise PassionError(f"{images.shape[0]} image channels but {len(available)} availability flags")
    if not any(available):
        raise PassionError("no modality is available")
    box = center_box(images.shape[1:], spec.crop_size)
    out = np.zeros((images.shape[0], *[hi - lo for lo, hi in box]), dtype=np.float32)
    for m, ok in enumerate(available):
        if ok:
            out[m] = crop_pad(zscore(images[m]), box)
    return out, box


def _label_values_msg(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:10])
    return shown + (", ..." if len(values) > 10 else "")


def remap_labels(raw: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Raw on-disk labels -> training classes (BraTS 4 -> 3); unknown values are an error."""
    raw = np.asarray(raw)
    values = np.unique(raw)
    known = np.array(sorted(spec.label_map), dtype=np.float64)
    bad = values[~np.isin(values.astype(np.float64), known)]
    if bad.size:
        raise PassionError(f"labels {_label_values_msg(bad)} are not in the {spec.name} label map "
                           f"{sorted(spec.label_map)}")
    out = np.zeros(raw.shape, dtype=np.uint8)
    for raw_value, cls in spec.label_map.items():
        if cls:
            out[raw == raw_value] = cls
    return out


def unmap_labels(classes: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Training classes -> raw on-disk labels (BraTS 3 -> 4), for writing predictions."""
    classes = np.asarray(classes)
    inverse = spec.inverse_label_map
    values = np.unique(classes)
    bad = values[~np.isin(values, np.array(sorted(inverse)))]
    if bad.size:
        raise PassionError(f"classes {_label_values_msg(bad)} are not in the {spec.name} classes {sorted(inverse)}")
    dtype = np.uint8 if max(inverse.values()) <= 255 and min(inverse.values()) >= 0 else np.int16
    out = np.zeros(classes.shape, dtype=dtype)
    for cls, raw_value in inverse.items():
        if raw_value:
            out[classes == cls] = raw_value
    return out


def prepare_case(files: CaseFiles, cache_dir: str | Path, spec: DatasetSpec, min_size=128,
                 grid: dict | None = None, strict: bool = False) -> dict:
    """Load, check, move onto the training `grid` ({"spacing", "orientation"}; None: the case's own),
    preprocess and cache one case; returns its dataset.json entry.

    On any failure the case directory is removed, so the cache never holds a half case.
    """
    stale = cache_mod.case_dir(cache_dir, files.name)
    if stale.exists() and not cache_mod.is_case_complete(cache_dir, files.name):
        shutil.rmtree(stale)  # left by an interrupted run
    try:
        loaded = layouts.load_case(files, spec, strict=strict)
        if not any(loaded.images[m].any() for m, ok in enumerate(loaded.available) if ok):
            raise PassionError(f"case {files.name}: every modality file is all zeros ({files.directory})")
        gm = grid_map(loaded.spatial_shape, loaded.affine, (grid or {}).get("spacing"),
                      (grid or {}).get("orientation"), keep_last_axis=spec.spatial_dims == 2)
        image, box = preprocess_for_spec(gm.images(loaded.images), loaded.available, spec, min_size)
        label = None
        if loaded.label is not None:
            try:
                label = crop_pad(gm.labels(remap_labels(loaded.label, spec), spec.num_classes), box)
            except PassionError as exc:
                raise PassionError(f"case {files.name}: {files.label}: {exc}") from None
        meta = {
            "name": files.name,
            "available": loaded.available,
            "original_shape": list(loaded.spatial_shape),
            "shape": list(image.shape[1:]),
            "affine": loaded.affine.tolist(),
            "spacing": gm.spacing,  # of the cached grid (HD95, post-processing volumes)
            "orientation": gm.orientation,
            "grid_shape": list(gm.shape),
            "grid": grid,
            "crop_box": box,
            "files": loaded.files,
            "has_label": label is not None,
            **({"crop_mode": "centre", "crop_size": list(spec.crop_size)} if spec.crop_size else {}),
        }
        cache_mod.write_case(cache_dir, files.name, image, label, meta)
    except BaseException:
        shutil.rmtree(cache_mod.case_dir(cache_dir, files.name), ignore_errors=True)
        raise
    return _index_entry(meta)


def _index_entry(meta: dict) -> dict:
    shape = meta.get("shape") or [hi - lo for lo, hi in meta["crop_box"]]
    return {"name": meta["name"], "available": [bool(a) for a in meta["available"]], "shape": list(shape)}


def _existing_entry(cache_dir: Path, name: str, grid: dict | None) -> dict:
    meta = cache_mod.read_case(cache_dir, name, mmap=True).meta
    if "grid" in meta and meta["grid"] != grid:  # an interrupted run with other --spacing/--orientation
        raise PassionError(f"case {name} in {cache_dir} was prepared on the grid {meta['grid']}, not {grid}; "
                           "use another cache directory")
    return _index_entry(meta)


def _cache_grid(cases: list[CaseFiles], cache_dir: Path, spec: DatasetSpec, spacing, orientation) -> dict | None:
    """The grid a cache holds or will hold; a cache from before grids were recorded keeps native grids."""
    if (cache_dir / "dataset.json").is_file():
        index = cache_mod.read_index(cache_dir)
        recorded = cache_mod.grid_of(index)
        if recorded is None:
            if spacing is not None or orientation:
                raise PassionError(f"{cache_dir} was prepared on each case's native grid; use another cache "
                                   "directory for --spacing/--orientation")
            print(f"warning: {cache_dir} was prepared before spacing and orientation were recorded; "
                  "its cases keep their native grids", file=sys.stderr)
            return None
        asked = plan_grid([], spacing or recorded["spacing"], orientation or recorded["orientation"])
        if asked["orientation"] != recorded["orientation"] or not same_spacing(asked["spacing"], recorded["spacing"]):
            raise PassionError(f"{cache_dir} was prepared at {recorded['spacing']} mm {recorded['orientation']}, "
                               f"not {asked['spacing']} mm {asked['orientation']}; use another cache directory")
        return recorded
    grids = [g for g in (layouts.reference_grid(c, spec) for c in cases) if g is not None]
    if not grids:
        return None  # every case is unreadable; each fails with its own message
    return plan_grid(grids, spacing, orientation)


def _check_cache_spec(cache_dir: Path, spec: DatasetSpec) -> None:
    """Refuse to mix datasets in one cache (the modality order would silently differ)."""
    if (cache_dir / "dataset.json").is_file():
        old = cache_mod.read_index(cache_dir)["spec"]
        if old.get("name") != spec.name or list(old.get("modalities", [])) != list(spec.modalities):
            raise PassionError(f"{cache_dir} was prepared for dataset {old.get('name')!r}, not {spec.name!r}; "
                               "use another cache directory")
        old_crop = list(old.get("crop_size") or [])
        if old_crop != list(spec.crop_size or []):
            raise PassionError(f"{cache_dir} was prepared with crop size {old_crop or None}, not "
                               f"{list(spec.crop_size or []) or None}; use another cache directory")


def prepare_dataset(raw_dir: str | Path, cache_dir: str | Path, spec: DatasetSpec | None, workers: int = 1,
                    on_error: str = "fail", min_size: int | Sequence[int] = 128, progress: bool = True, *,
                    spacing: Sequence[float] | None = None, orientation: str | None = None,
                    strict: bool = False) -> dict:
    """Turn a raw folder (BraTS, nnU-Net v2 or MSD layout: data/layouts.py; spec None: the preset its
    names fit, else the dataset's own) into the training cache; re-running only does the missing cases.

    Every case is brought onto one grid: `orientation` (axis codes; default the most common one) and
    `spacing` in mm (default the median spacing), both recorded in dataset.json. strict: refuse cases
    whose modalities lie on different grids instead of resampling them onto the first one.

    on_error="fail" stops at the first bad case (finished cases stay, no dataset.json is written);
    "skip" leaves bad cases out, lists them in the summary and in dataset.json under "failed".
    """
    if on_error not in ("fail", "skip"):
        raise PassionError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if int(workers) < 1:
        raise PassionError(f"workers must be at least 1, not {workers}")
    cache_dir = Path(cache_dir)
    raw = layouts.open_raw(raw_dir, spec)  # spec None: what the folder's layout says
    spec, cases = raw.spec, raw.cases
    _check_cache_spec(cache_dir, spec)
    grid = _cache_grid(cases, cache_dir, spec, spacing, orientation)
    entries: dict[str, dict] = {}
    todo = []
    for files in cases:
        if cache_mod.is_case_complete(cache_dir, files.name):
            entries[files.name] = _existing_entry(cache_dir, files.name, grid)
        else:
            todo.append(files)
    failed = _run_cases(todo, cache_dir, spec, int(workers), on_error, min_size, progress, entries, grid, strict)
    ordered = [entries[c.name] for c in cases if c.name in entries]
    extra = {"raw_dir": str(Path(raw_dir).resolve()), "layout": raw.layout, "min_size": min_size, **(grid or {}),
             "failed": failed}
    cache_mod.write_index(cache_dir, spec, ordered, extra)
    return {"cache": str(cache_dir), "layout": raw.layout, "dataset": spec.name, "mapping": raw.mapping,
            "cases": len(cases), "prepared": len(todo) - len(failed),
            "already_done": len(cases) - len(todo), "failed": failed, "indexed": len(ordered), "grid": grid}


def _record_failure(name: str, exc: Exception, on_error: str, failed: list[dict]) -> None:
    if on_error == "fail" or not isinstance(exc, PassionError):
        raise exc
    failed.append({"name": name, "error": str(exc)})
    print(f"skipped: {exc}", file=sys.stderr)


def _run_cases(todo: list[CaseFiles], cache_dir: Path, spec: DatasetSpec, workers: int, on_error: str,
               min_size, show: bool, entries: dict[str, dict], grid: dict | None, strict: bool) -> list[dict]:
    failed: list[dict] = []
    bar = progress(total=len(todo), desc="prepare", disable=not show or not todo)
    with bar:
        if workers == 1 or len(todo) <= 1:
            for files in todo:
                try:
                    entries[files.name] = prepare_case(files, cache_dir, spec, min_size, grid, strict)
                except Exception as exc:
                    _record_failure(files.name, exc, on_error, failed)
                bar.update(status=files.name)
            return failed
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            pending = {pool.submit(prepare_case, f, cache_dir, spec, min_size, grid, strict): f for f in todo}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        files = pending.pop(fut)
                        try:
                            entries[files.name] = fut.result()
                        except Exception as exc:
                            _record_failure(files.name, exc, on_error, failed)
                        bar.update(status=files.name)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return failed
