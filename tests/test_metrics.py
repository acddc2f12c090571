"""Region metrics on hand-made shapes with known Dice and HD95."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from passion.data.spec import get_spec
from passion.engine import metrics as M

SPEC = get_spec("brats2020")


def cube(shape, lo, side):
    m = np.zeros(shape, bool)
    m[tuple(slice(l, l + side) for l in lo)] = True
    return m


def brute_hd95(a, b, spacing):
    """Independent HD95: surface voxels by erosion, all pairwise distances, max of both percentiles."""
    def surface(m):
        pts = np.argwhere(m & ~ndimage.binary_erosion(m))
        return pts * np.asarray(spacing, float)

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_offset_cubes():
    a = cube((24, 24, 24), (4, 4, 4), 10)
    for k in (0, 1, 3, 7):
        b = cube((24, 24, 24), (4 + k, 4, 4), 10)
        assert M.dice(a, b) == pytest.approx((10 - k) / 10)


def test_hd95_single_voxels_anisotropic():
    a = np.zeros((8, 8, 12), bool)
    b = np.zeros_like(a)
    a[2, 3, 1] = True
    b[2, 3, 4] = True
    assert M.hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)
    b2 = np.zeros_like(a)
    b2[5, 7, 1] = True  # 3 and 4 voxels along the first two axes with spacing 2 and 0.5
    assert M.hd95(a, b2, spacing=(2.0, 0.5, 1.0)) == pytest.approx(np.hypot(6.0, 2.0))


def test_hd95_parallel_plates_known_value():
    # one-voxel-thick plates: every voxel is a surface voxel and its nearest voxel in the
    # other plate is straight across, 3 voxels away along the last axis
    a = np.zeros((44, 44, 10), bool)
    b = np.zeros_like(a)
    a[2:42, 2:42, 2] = True
    b[2:42, 2:42, 5] = True
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(a, b, spacing=(0.7, 0.9, 2.5)) == pytest.approx(7.5)
    assert M.dice(a, b) == 0.0


def test_hd95_concentric_cubes_matches_brute_force():
    inner = cube((40, 40, 40), (5, 5, 5), 30)
    outer = cube((40, 40, 40), (3, 3, 3), 34)
    assert M.hd95(inner, outer) == pytest.approx(brute_hd95(inner, outer, (1, 1, 1)), rel=1e-5)
    assert M.dice(inner, outer) == pytest.approx(2 * 30**3 / (30**3 + 34**3))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.8, 3.0)])
def test_hd95_matches_brute_force(spacing):
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:30, :30, :30]
    a = (zz - 14) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2 <= 8 ** 2
    b = (zz - 17) ** 2 + (yy - 13) ** 2 + (xx - 16) ** 2 <= 6 ** 2
    b |= rng.random(b.shape) > 0.9995  # a few stray voxels
    assert M.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-5, abs=1e-5)
    a_cube = cube((30, 30, 30), (3, 4, 5), 12)
    b_cube = cube((30, 30, 30), (6, 4, 5), 12)
    assert M.hd95(a_cube, b_cube, spacing) == pytest.approx(brute_hd95(a_cube, b_cube, spacing), rel=1e-5)


def test_empty_conventions():
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2, 2, 2] = True
    assert M.dice(z, z) == M.BOTH_EMPTY_DICE == 1.0
    assert M.hd95(z, z) == M.BOTH_EMPTY_HD95 == 0.0
    assert M.dice(one, z) == M.dice(z, one) == M.ONE_EMPTY_DICE == 0.0
    assert M.hd95(one, z) == M.hd95(z, one) == M.ONE_EMPTY_HD95 == 373.13
    conv = M.conventions(SPEC)
    assert conv["one_empty"]["hd95"] == 373.13 and conv["postprocess"]["min_volume_mm3"] == 500
    assert "500 mm^3" in conv["postprocess"]["rule"] and "voxel volume" in conv["postprocess"]["rule"]


def test_regions_and_etpost():
    assert M.region_names(SPEC) == ["WT", "TC", "ET", "ETpost"]
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:12, 2:12, 2:12] = 2  # edema
    ref[4:8, 4:8, 4:8] = 1  # necrosis
    pred = ref.copy()
    pred[9:11, 9:11, 9:11] = 3  # 8 ET voxels: a false positive removed by post-processing
    r = M.region_metrics(pred, ref, SPEC, spacing=(1, 1, 1))
    assert set(r) == {"WT", "TC", "ET", "ETpost"}
    assert r["WT"]["dice"] == 1.0 and r["WT"]["hd95"] == 0.0
    assert r["ET"]["dice"] == 0.0 and r["ET"]["hd95"] == 373.13
    assert r["ETpost"]["dice"] == 1.0 and r["ETpost"]["hd95"] == 0.0
    tc_pred = 64 + 8
    assert r["TC"]["dice"] == pytest.approx(2 * 64 / (tc_pred + 64))

    # a large enough ET survives post-processing
    big_ref = np.zeros((20, 20, 20), np.uint8)
    big_ref[1:10, 1:10, 1:10] = 3  # 729 voxels
    r2 = M.region_metrics(big_ref, big_ref, SPEC)
    assert r2["ETpost"]["dice"] == 1.0 and r2["ET"]["dice"] == 1.0
    masks = M.region_masks(pred, SPEC)
    assert masks["ET"].sum() == 8 and masks["ETpost"].sum() == 0
    pp = M.postprocess_classes(pred, SPEC)
    assert (pp == 3).sum() == 0 and (pp[9:11, 9:11, 9:11] == 0).all()


def _et_voxels(n: int, shape=(30, 30, 30)) -> np.ndarray:
    """A class map holding one ET component of n voxels (training class 3) and nothing else."""
    classes = np.zeros(shape, np.uint8)
    classes.reshape(-1)[:n] = 3
    return classes


@pytest.mark.parametrize("spacing, kept, dropped", [
    ((5.0, 5.0, 5.0), 4, 3),  # 125 mm^3 voxels: 500 mm^3 survive, 375 mm^3 do not
    (None, 500, 499),  # no spacing: 1 mm isotropic, the paper's 500 voxels
    ((1.0, 1.0, 1.0), 500, 499),
    ((0.9999999, 1.0, 1.0), 500, 499),  # spacing rounding from an affine does not drop exactly 500 mm^3
    ((1.0, 1.0, 2.0), 250, 249),
])
def test_etpost_threshold_is_a_physical_volume(spacing, kept, dropped):
    for n, survives in ((kept, True), (dropped, False)):
        classes = _et_voxels(n)
        assert M.region_masks(classes, SPEC, spacing=spacing)["ETpost"].sum() == (n if survives else 0)
        assert (M.postprocess_classes(classes, SPEC, spacing) == 3).sum() == (n if survives else 0)
        r = M.region_metrics(classes, classes, SPEC, spacing=spacing, with_hd95=False)
        assert r["ETpost"]["dice"] == (1.0 if survives else 0.0) and r["ET"]["dice"] == 1.0


def test_spec_threshold_is_configurable_and_reads_old_files():
    from dataclasses import replace

    from passion.data.spec import DatasetSpec

    small = replace(SPEC, postprocess_min_volume_mm3=100.0)
    assert M.region_masks(_et_voxels(4), small, spacing=(3.0, 3.0, 3.0))["ETpost"].sum() == 4  # 108 mm^3
    assert DatasetSpec.from_dict(small.to_dict()) == small
    legacy = {k: v for k, v in SPEC.to_dict().items() if k != "postprocess_min_volume_mm3"}
    assert DatasetSpec.from_dict({**legacy, "postprocess_min_voxels": 300}).postprocess_min_volume_mm3 == 300.0
    assert DatasetSpec.from_dict(legacy).postprocess_min_volume_mm3 == 500.0


def test_evaluation_subsets():
    assert len(M.evaluation_subsets(SPEC, "all")) == 15
    assert M.evaluation_subsets(SPEC, None) == SPEC.subsets()
    sel = M.evaluation_subsets(SPEC, "t2,flair+t1ce")
    assert sel == [(False, False, False, True), (True, True, False, False)]
    assert M.subset_modalities(SPEC, sel[1]) == ["flair", "t1ce"]
    with pytest.raises(ValueError):
        M.evaluation_subsets(SPEC, "flair+pd")
