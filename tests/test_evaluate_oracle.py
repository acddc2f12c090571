"""`evaluate` end to end against an oracle: exact predictions score Dice 1 / HD95 0 everywhere, and a
one-voxel offset along the coarse axis scores the hand-computed Dice and HD95 in millimetres."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from passion.data.spec import get_spec
from passion.engine.evaluate import evaluate

from oracle import oracle_checkpoint, write_class_cache, write_split

BRATS = get_spec("brats2020")
MYOPS = get_spec("myops2020")
SPACING = (1.0, 1.25, 2.5)  # voxel volume 3.125 mm^3


def _nested_tumour(shape=(24, 22, 20), shift=0) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[3 + shift:21, 3:19, 2:18] = 2  # edema
    label[5 + shift:19, 5:17, 4:16] = 1  # necrosis
    label[7 + shift:15, 7:15, 6:12] = 3  # enhancing: 384 voxels = 1200 mm^3, kept by ETpost
    return label


def _per_case_rows(run) -> list[dict]:
    with open(run / "eval" / "test" / "per_case.csv") as f:
        return list(csv.DictReader(f))


def _run(tmp_path, spec, cases, spacing, patch):
    cache = write_class_cache(tmp_path, spec, cases, spacing)
    ckpt = oracle_checkpoint(tmp_path, spec, patch, cache, write_split(tmp_path, list(cases)))
    return ckpt.parent.parent


def test_exact_predictions_score_dice_1_and_hd95_0_in_every_subset_and_region(tmp_path):
    cases = {"p1": (_nested_tumour(),) * 2, "p2": (_nested_tumour(shift=1),) * 2}
    run = _run(tmp_path, BRATS, cases, SPACING, [16, 16, 16])
    res = evaluate(run, split="test", progress=False)
    regions = ["WT", "TC", "ET", "ETpost"]
    assert len(res["subsets"]) == 15 and res["regions"] == regions
    for entry in res["subsets"] + [res["mean"]]:
        assert entry["dice"] == pytest.approx(dict.fromkeys(regions, 1.0), abs=1e-6)
        assert entry["hd95"] == pytest.approx(dict.fromkeys(regions, 0.0), abs=1e-6)
    rows = _per_case_rows(run)
    assert len(rows) == 2 * 15 * 4 and all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0 for r in rows)


def test_a_one_voxel_offset_scores_hand_computed_dice_and_hd95_in_mm(tmp_path):
    """Reference: a 10x10x2 enhancing slab; prediction: the same slab one voxel further along the
    2.5 mm axis. Half of each slab overlaps: Dice = 2*100/(200+200) = 0.5. Every voxel of a
    2-voxel-thick slab is on its surface; half of them lie on the other slab (0 mm), half one
    voxel away from it along that axis (2.5 mm), so HD95 = 2.5 mm (1 voxel if spacing were lost).
    200 voxels = 625 mm^3 >= 500: ETpost keeps the prediction (it would drop it at 1 mm^3 a voxel)."""
    label = np.zeros((24, 22, 20), np.uint8)
    label[6:16, 5:15, 8:10] = 3
    shifted = np.roll(label, 1, axis=2)
    run = _run(tmp_path, BRATS, {"p1": (shifted, label)}, SPACING, [16, 16, 16])
    res = evaluate(run, split="test", progress=False)
    for entry in res["subsets"] + [res["mean"]]:
        assert entry["dice"] == pytest.approx(dict.fromkeys(["WT", "TC", "ET", "ETpost"], 0.5), abs=1e-6)
        assert entry["hd95"] == pytest.approx(dict.fromkeys(["WT", "TC", "ET", "ETpost"], 2.5), abs=1e-6)


def test_2d_exact_predictions_score_dice_1_and_hd95_0_over_each_slice_stack(tmp_path):
    label = np.zeros((40, 36, 3), np.uint8)  # [H, W, slices] of a MyoPS subject
    label[10:30, 8:24, :] = 1  # myocardium
    label[14:26, 12:20, :] = 2  # LV blood pool
    label[12:28, 26:32, 1:] = 3  # RV blood pool, not on the first slice
    label[10:14, 8:12, 1] = 5  # scar (still MYO)
    run = _run(tmp_path, MYOPS, {"m1": (label, label)}, (1.0, 1.0, 5.0), [32, 32])
    res = evaluate(run, split="test", progress=False)
    assert len(res["subsets"]) == 7 and res["regions"] == ["LV", "RV", "MYO"]
    for entry in res["subsets"] + [res["mean"]]:
        assert entry["dice"] == pytest.approx(dict.fromkeys(["LV", "RV", "MYO"], 1.0), abs=1e-6)
        assert entry["hd95"] == pytest.approx(dict.fromkeys(["LV", "RV", "MYO"], 0.0), abs=1e-6)
