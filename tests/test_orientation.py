"""Orientation: a scan stored flipped (LPS) or with permuted axes, its affine adjusted, gives the same
structures at the same world positions, in `predict` and in the `prepare` cache."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from passion.data import cache as cache_mod
from passion.data.geometry import axis_codes, check_affine
from passion.data.preprocess import prepare_dataset
from passion.engine.predict import predict
from passion.utils import PassionError

from geometry_helpers import BRATS, CONV, checkpoint, grid_affine, phantom, write_case
from oracle import ORACLE

SHAPE, AFFINE = (20, 20, 16), grid_affine((2.0, 2.0, 2.0), origin=(0.5, -0.5, 1.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def restore(data: np.ndarray, affine: np.ndarray, flips=(), axes=(0, 1, 2)):
    """The same voxels stored another way: flip `flips` axes, then transpose to `axes`; the affine
    is adjusted so every voxel keeps its world position."""
    a = np.array(affine, dtype=np.float64)
    for ax in flips:
        data = np.flip(data, ax)
        shift = np.eye(4)
        shift[ax, ax], shift[ax, 3] = -1.0, data.shape[ax] - 1
        a = a @ shift
    return np.ascontiguousarray(data.transpose(axes)), a[:, [*axes, 3]]


def in_world(ref: np.ndarray, ref_affine, shape, affine) -> np.ndarray:
    """`ref` looked up at the world position of every voxel of another grid over the same voxels."""
    idx = np.indices(shape).reshape(3, -1)
    m = np.linalg.inv(ref_affine) @ np.asarray(affine)
    src = np.rint(m[:3, :3] @ idx + m[:3, 3:4]).astype(int)
    return ref[tuple(src)].reshape(shape)


VARIANTS = {"LAS": ((0,), (0, 1, 2)), "LPS": ((0, 1), (0, 1, 2)), "permuted": ((), (2, 0, 1)),
            "LPS permuted": ((0, 1), (1, 2, 0))}


def _predict(tmp_path, ckpt, name, volumes, affine, tag):
    case = write_case(tmp_path / f"raw_{tag}", name, volumes, affine)
    out = predict(ckpt, [case], output_dir=tmp_path / f"out_{tag}", progress=False, log=None)
    img = nib.load(str(out[0]))
    return img, np.asarray(img.dataobj)


def test_flipped_and_permuted_scans_agree_voxel_for_voxel_in_world_space(tmp_path):
    volumes, _ = phantom(SHAPE, AFFINE)
    ckpt = checkpoint(tmp_path / "model", CONV, spacing=[2.0, 2.0, 2.0], orientation="RAS")
    _, ref = _predict(tmp_path, ckpt, "ref", volumes, AFFINE, "ref")
    assert len(np.unique(ref)) >= 2  # a real segmentation to compare, not an empty map
    old = checkpoint(tmp_path / "old", CONV)  # no recorded orientation: each input as it is stored
    differs_without_reorientation = False
    for tag, (flips, axes) in VARIANTS.items():
        moved = {k: restore(v, AFFINE, flips, axes)[0] for k, v in volumes.items()}
        affine = restore(volumes["flair"], AFFINE, flips, axes)[1]
        assert axis_codes(affine) != "RAS"
        img, labels = _predict(tmp_path, ckpt, "moved", moved, affine, tag.replace(" ", "_"))
        assert img.shape == moved["flair"].shape and np.allclose(img.affine, affine)
        np.testing.assert_array_equal(labels, in_world(ref, AFFINE, labels.shape, affine), err_msg=tag)
        _, naive = _predict(tmp_path, old, "moved", moved, affine, "old_" + tag.replace(" ", "_"))
        differs_without_reorientation |= not np.array_equal(naive, in_world(ref, AFFINE, labels.shape, affine))
    assert differs_without_reorientation  # the test would catch a predict that never reorients


def test_an_lps_anisotropic_scan_is_segmented_where_the_world_phantom_is(tmp_path):
    """Orientation and spacing together: the model works at 1 mm RAS; the scan is LPS, permuted, 1.5/2/0.8 mm."""
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[1.0, 1.0, 1.0], orientation="RAS")
    shape = (27, 20, 50)
    ras = grid_affine((1.5, 2.0, 0.8), origin=(0.2, 0.1, -0.3))
    volumes, structure = phantom(shape, ras)
    moved = {k: restore(v, ras, (0, 1), (2, 0, 1))[0] for k, v in volumes.items()}
    truth, affine = restore(structure, ras, (0, 1), (2, 0, 1))
    img, labels = _predict(tmp_path, ckpt, "lps", moved, affine, "lps")
    assert img.shape == truth.shape and np.allclose(img.affine, affine)
    et = labels == 4
    assert 2 * (et & truth).sum() / (et.sum() + truth.sum()) >= 0.85
    assert et[ndimage.binary_erosion(truth)].all() and not (labels > 0)[~ndimage.binary_dilation(truth)].any()


def test_prepare_brings_every_case_into_the_majority_orientation(tmp_path, synth_raw_dir):
    src = sorted(p for p in synth_raw_dir.iterdir() if p.is_dir())[0]
    raw = tmp_path / "raw"
    for name, flips, axes in (("A", (), (0, 1, 2)), ("B", (), (0, 1, 2)), ("C", (0, 1), (1, 2, 0))):
        (raw / name).mkdir(parents=True)
        for f in src.iterdir():
            img = nib.load(str(f))
            data, affine = restore(np.asarray(img.dataobj), img.affine, flips, axes)
            nib.save(nib.Nifti1Image(data, affine), str(raw / name / f.name.replace(src.name, name)))
    prepare_dataset(raw, tmp_path / "cache", BRATS, min_size=8, progress=False)
    index = cache_mod.read_index(tmp_path / "cache")
    assert index["orientation"] == "RAS"
    a, c = (cache_mod.read_case(tmp_path / "cache", n) for n in ("A", "C"))
    assert c.meta["orientation"] == "RAS" and axis_codes(np.array(c.meta["affine"])) == "PSL"
    np.testing.assert_array_equal(c.image, a.image)
    np.testing.assert_array_equal(c.label, a.label)


@pytest.mark.parametrize("affine, message", [
    (np.diag([1.0, 0.0, 1.0, 1.0]), "degenerate"),
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "collinear"),
    (np.diag([0.1, 0.1, 20.0, 1.0]), "anisotropic"),
    (np.full((4, 4), np.nan), "finite"),
])
def test_unusable_affines_are_one_line_errors_that_leave_nothing(tmp_path, affine, message):
    with pytest.raises(PassionError, match=message):
        check_affine(affine, "x.nii.gz")
    volumes, _ = phantom(SHAPE, AFFINE)
    bad = tmp_path / "raw" / "bad"
    bad.mkdir(parents=True)
    header = nib.Nifti1Header()  # the sform alone, as a broken converter writes it (nibabel refuses the affine)
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(volumes["flair"], None, header), str(bad / "bad_flair.nii.gz"))
    ckpt = checkpoint(tmp_path / "model", ORACLE, spacing=[2.0, 2.0, 2.0], orientation="RAS")
    with pytest.raises(PassionError, match=message) as info:
        predict(ckpt, [bad], output_dir=tmp_path / "out", progress=False, log=None)
    assert "\n" not in str(info.value) and "bad_flair" in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PassionError, match=message):
        prepare_dataset(tmp_path / "raw", tmp_path / "cache", BRATS, min_size=8, progress=False)
    assert not cache_mod.case_dir(tmp_path / "cache", "bad").exists()
    assert not (tmp_path / "cache" / "dataset.json").exists()
