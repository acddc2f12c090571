"""Region metrics for evaluation: Dice and HD95 per region with the BraTS conventions.

Regions come from the dataset spec (BraTS: WT = {1,2,3}, TC = {1,3}, ET = {3}), plus one
post-processed region (BraTS: ``ETpost``): the predicted ET is dropped entirely when its volume
is under ``spec.postprocess_min_volume_mm3`` (METHOD.md section 7: 500 voxels of BraTS's 1 mm
isotropic grid, i.e. 500 mm^3), converted with the case's voxel volume so that the rule means
the same on data of any spacing; no spacing means 1 mm isotropic.

Empty regions follow the BraTS convention instead of MONAI's NaN/inf, and the values are
module constants so that every report can state them:

- reference and prediction both empty: Dice 1, HD95 0;
- exactly one of them empty: Dice 0, HD95 373.13 mm (the BraTS challenge's worst-case value,
  the diagonal of a 240x240x155 1 mm volume).

Non-empty regions use MONAI (``compute_dice``, ``compute_hausdorff_distance`` with
``percentile=95`` and the voxel spacing, so HD95 is in millimetres).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from ..data.spec import DatasetSpec, Mask

BOTH_EMPTY_DICE = 1.0
BOTH_EMPTY_HD95 = 0.0
ONE_EMPTY_DICE = 0.0
ONE_EMPTY_HD95 = 373.13
HD_PERCENTILE = 95.0


def conventions(spec: DatasetSpec | None = None) -> dict:
    """The empty-region values and post-processing rule, as stated in every results file."""
    out = {
        "both_empty": {"dice": BOTH_EMPTY_DICE, "hd95": BOTH_EMPTY_HD95},
        "one_empty": {"dice": ONE_EMPTY_DICE, "hd95": ONE_EMPTY_HD95},
        "hd_percentile": HD_PERCENTILE,
        "hd_units": "mm (voxel spacing of the case)",
    }
    if spec is not None and spec.postprocess_region:
        vol = spec.postprocess_min_volume_mm3
        out["postprocess"] = {
            "region": spec.postprocess_region,
            "name": postprocessed_name(spec),
            "min_volume_mm3": vol,
            "rule": f"predicted {spec.postprocess_region} with a volume under {vol:g} mm^3 is set to background; "
                    f"the threshold is converted with each case's voxel volume (product of its spacing), "
                    f"i.e. {vol:g} voxels at 1 mm isotropic",
        }
    return out


def voxel_volume_mm3(spacing: Sequence[float] | None) -> float:
    """Volume of one voxel; an unknown spacing is taken as 1 mm isotropic (BraTS)."""
    return float(np.prod([float(s) for s in spacing])) if spacing is not None else 1.0


def _keep_postprocess_region(mask: np.ndarray, spec: DatasetSpec, spacing: Sequence[float] | None) -> bool:
    """The post-processing rule, in one place: keep the predicted region if it is big enough in mm^3.

    The relative tolerance absorbs rounding in spacings derived from affines (0.9999999 mm), which
    would otherwise drop a region of exactly the threshold volume.
    """
    volume = int(np.count_nonzero(mask)) * voxel_volume_mm3(spacing)
    return volume >= spec.postprocess_min_volume_mm3 * (1 - 1e-6)


def postprocessed_name(spec: DatasetSpec) -> str | None:
    return f"{spec.postprocess_region}post" if spec.postprocess_region else None


def region_names(spec: DatasetSpec) -> list[str]:
    """Evaluation regions in report order, e.g. ['WT', 'TC', 'ET', 'ETpost']."""
    names = list(spec.regions)
    post = postprocessed_name(spec)
    if post:
        names.append(post)
    return names


def region_mask(classes: np.ndarray, classes_in_region: Sequence[int]) -> np.ndarray:
    return np.isin(np.asarray(classes), np.asarray(list(classes_in_region)))


def region_masks(classes: np.ndarray, spec: DatasetSpec, postprocess: bool = True,
                 spacing: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Boolean mask per evaluation region of a class map (training class indices)."""
    out = {name: region_mask(classes, cls) for name, cls in spec.regions.items()}
    post = postprocessed_name(spec)
    if postprocess and post:
        m = out[spec.postprocess_region]
        out[post] = m if _keep_postprocess_region(m, spec, spacing) else np.zeros_like(m)
    return out


def postprocess_classes(classes: np.ndarray, spec: DatasetSpec, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Class map with a too-small predicted post-processing region (BraTS: ET) set to background."""
    if not spec.postprocess_region:
        return classes
    m = region_mask(classes, spec.regions[spec.postprocess_region])
    if m.any() and not _keep_postprocess_region(m, spec, spacing):
        classes = classes.copy()
        classes[m] = 0
    return classes


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks with the BraTS empty conventions."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return BOTH_EMPTY_DICE
    if p_any != r_any:
        return ONE_EMPTY_DICE
    from monai.metrics import compute_dice

    return float(compute_dice(_as_batch(pred), _as_batch(ref), include_background=True)[0, 0])


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel (distances are unchanged)."""
    union = pred | ref
    sl = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        sl.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    sl = tuple(sl)
    return pred[sl], ref[sl]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between the surfaces of two masks."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return BOTH_EMPTY_HD95
    if p_any != r_any:
        return ONE_EMPTY_HD95
    from monai.metrics import compute_hausdorff_distance

    pred, ref = _crop_to_union(pred, ref)
    sp = [float(s) for s in spacing] if spacing is not None else None
    with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(_as_batch(pred), _as_batch(ref), include_background=True,
                                           percentile=HD_PERCENTILE, spacing=sp)
    return float(value.reshape(-1)[0])


def region_metrics(pred_classes: np.ndarray, ref_classes: np.ndarray, spec: DatasetSpec,
                   spacing: Sequence[float] | None = None, with_hd95: bool = True) -> dict[str, dict[str, float]]:
    """{region: {"dice": float, "hd95": float}} for every evaluation region (ETpost included).

    The post-processed region is scored against the same reference region; it only changes
    the prediction.
    """
    pred_classes = np.asarray(pred_classes)
    ref_classes = np.asarray(ref_classes)
    if pred_classes.shape != ref_classes.shape:
        raise ValueError(f"prediction shape {pred_classes.shape} != reference shape {ref_classes.shape}")
    pred = region_masks(pred_classes, spec, spacing=spacing)
    ref = region_masks(ref_classes, spec, postprocess=False)
    post = postprocessed_name(spec)
    out = {}
    for name in region_names(spec):
        r = ref[spec.postprocess_region] if name == post else ref[name]
        out[name] = {
            "dice": dice(pred[name], r),
            "hd95": hd95(pred[name], r, spacing) if with_hd95 else float("nan"),
        }
    return out


def evaluation_subsets(spec: DatasetSpec, subsets: str | Sequence | None = "all") -> list[Mask]:
    """Resolve a subset request: 'all' / None -> every non-empty subset in the spec's order;
    'flair+t1ce,t2' or a list of names/masks -> those subsets (kept in the spec's order)."""
    every = spec.subsets()
    if subsets is None or (isinstance(subsets, str) and subsets.strip().lower() in ("all", "")):
        return every
    if isinstance(subsets, str):
        items: list = [s for s in subsets.split(",") if s.strip()]
    else:
        items = list(subsets)
    wanted = set()
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            mask = every[-1] if text.lower() == "full" else spec.parse_subset(text)
        else:
            mask = tuple(bool(v) for v in item)
            if len(mask) != spec.num_modalities or not any(mask):
                raise ValueError(f"subset {list(item)} is not a non-empty mask over {spec.num_modalities} modalities")
        wanted.add(mask)
    return [m for m in every if m in wanted]


def subset_modalities(spec: DatasetSpec, mask: Mask) -> list[str]:
    return [m for m, on in zip(spec.modalities, mask) if on]
