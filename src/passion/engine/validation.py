"""Validation during training: Dice of the full subset and the mean over modality subsets.

The trainer asks three things of this module: which val cases to use (`select_val_cases`, a
fixed subsample drawn from the seed), whether an epoch validates (`is_validation_epoch`), and
the scores of the model now (`validate`). Prediction and scoring are those of `passion
evaluate` (engine.inference.predict_classes, engine.evaluate.score_case / summarise), without
HD95, so a validation Dice is the evaluation Dice of the same cases.

`validate` leaves the training state as it found it: it runs under no_grad in eval mode and
restores the model's train mode and every RNG (python, numpy, torch, CUDA) afterwards, so a
run with validation trains exactly as one without, and an exact resume stays exact.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.spec import DatasetSpec
from ..utils import PassionError
from . import metrics as M

# entropy for the val-case draw, so it never coincides with another stream seeded by train.seed alone
_VAL_STREAM = 0x7A1


def validation_interval(epochs: int, val_every: int | None) -> int:
    """Epochs between validations: val_every, or 10 % of the run (at least 1)."""
    return int(val_every) if val_every else max(1, round(epochs / 10))


def is_validation_epoch(epoch: int, epochs: int, val_every: int | None) -> bool:
    """Validate after epoch index `epoch` (0-based) every interval, and always after the last one."""
    done = epoch + 1
    return done == epochs or done % validation_interval(epochs, val_every) == 0


def select_val_cases(names: Sequence[str], count: int | None, seed: int) -> list[str]:
    """A fixed subsample of `count` val cases (None: all), the same for a seed on every rank and resume."""
    names = list(names)
    if count is None or count >= len(names):
        return names
    pick = np.random.default_rng([int(seed), _VAL_STREAM]).choice(len(names), size=int(count), replace=False)
    return [names[i] for i in sorted(pick.tolist())]


def val_case_names(cfg, split_val: Sequence[str], spec: DatasetSpec) -> tuple[list[str], str]:
    """The run's fixed val cases, checked before training, and a note when validation is off."""
    from ..data.cache import case_dir, match_cache_names

    t = cfg.train
    validation_subsets(spec, t.val_subsets)
    if t.val_cases == 0:
        return [], "validation is off (train.val_cases=0)"
    if not split_val:
        return [], f"validation skipped: split {cfg.data.split} has no val cases"
    names = match_cache_names(select_val_cases(split_val, t.val_cases, t.seed), Path(cfg.data.cache))
    unlabelled = [n for n in names if not (case_dir(cfg.data.cache, n) / "label.npy").is_file()]
    if unlabelled:
        raise PassionError(f"val case {unlabelled[0]!r} in {cfg.data.cache} has no label; it cannot be validated")
    return names, ""


def validation_subsets(spec: DatasetSpec, subsets: str | Sequence = "all") -> list:
    """The subsets averaged into the score, in the spec's order (checked before training starts)."""
    try:
        masks = M.evaluation_subsets(spec, subsets)
    except ValueError as exc:
        raise PassionError(f"train.val_subsets: {exc}") from None
    if not masks:
        raise PassionError(f"train.val_subsets: no modality subset selected by {subsets!r}")
    return masks


def score_regions(spec: DatasetSpec) -> list[str]:
    """The dataset's own regions (BraTS WT/TC/ET), without the post-processed variant."""
    post = M.postprocessed_name(spec)
    return [r for r in M.region_names(spec) if r != post]


@contextlib.contextmanager
def _rng_untouched(device: torch.device):
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def validate(model, cache: str | Path, cases: Sequence[str], spec: DatasetSpec, *, roi_size: Sequence[int],
             subsets: str | Sequence = "all", overlap: float = 0.5, sw_batch_size: int = 1,
             device: str | torch.device = "cpu", precision: str = "fp32", fuse_batch: int | None = None,
             status=None) -> dict:
    """Score `model` on the val `cases` of the cache; returns the epoch-record fields

        {"val_dice": {"full": {region: dice}, "mean": {region: dice}}, "val_score": float,
         "val_cases": int, "val_seconds": float}

    "full" is the subset with every modality, "mean" the mean over `subsets` (default all 2^M-1) of
    the per-subset means over cases, and val_score the mean of "mean" over the regions (the quantity
    best.pt maximises). A case lacking a modality is scored on the subsets it has. `status(text)`
    is called before each case (progress).
    """
    from ..data.datasets import EvalDataset
    from ..utils import json_safe
    from .evaluate import score_case, summarise
    from .inference import DEFAULT_FUSE_BATCH, inference_precision, predict_classes, resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)
    scored = validation_subsets(spec, subsets)
    full = spec.subsets()[-1]
    masks = scored if full in scored else scored + [full]  # the full subset is always reported
    regions = score_regions(spec)
    precision = inference_precision(None, precision, dev)
    data = EvalDataset(cache, list(cases), spec=spec)
    rows: list[dict] = []
    was_training = model.training
    try:
        with _rng_untouched(dev), torch.no_grad():
            model.eval()
            for i in range(len(data)):
                item = data[i]
                if status is not None:
                    status(f"validating {i + 1}/{len(data)}")
                if item["label"] is None:
                    raise PassionError(f"val case {item['name']} in {cache} has no label; it cannot be validated")
                avail = [bool(v) for v in item["available"].tolist()]
                usable = [m for m in masks if all(a or not on for a, on in zip(avail, m))]
                if not usable:
                    continue
                classes = predict_classes(model, item["image"], usable, roi_size=list(roi_size), available=avail,
                                          overlap=overlap, sw_batch_size=sw_batch_size, device=dev,
                                          precision=precision, fuse_batch=fuse_batch or DEFAULT_FUSE_BATCH)
                rows += score_case(item["name"], classes, item["label"].numpy(), spec, usable,
                                   item["meta"].get("spacing"), with_hd95=False)
    finally:
        model.train(was_training)
    if not rows:
        raise PassionError(f"no val case of {cache} has the modalities of any subset in train.val_subsets")
    _, mean = summarise(rows, spec, scored, regions)
    (full_entry,), _ = summarise(rows, spec, [full], regions)
    mean_dice = mean["dice"]
    score = [v for v in mean_dice.values() if not math.isnan(v)]
    return {
        # NaN (no val case has the subset's modalities) -> null, so that metrics.jsonl stays strict JSON
        "val_dice": json_safe({"full": full_entry["dice"], "mean": mean_dice}),
        "val_score": float(np.mean(score)) if score else None,
        "val_cases": len({r["case"] for r in rows}),
        "val_seconds": round(time.perf_counter() - start, 3),
    }


def is_better(score: float | None, best: dict | None) -> bool:
    """A strictly higher score than the best so far (None/NaN never is); ties keep the earlier epoch."""
    if score is None or score != score:
        return False
    return best is None or score > best["val_score"]
