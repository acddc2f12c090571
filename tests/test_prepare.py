"""`passion prepare`: cache contents, z-score, missing files, idempotence, inverse, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from passion import cli
from passion.data import cache as cache_mod
from passion.data.nifti import load_volume, write_label_map
from passion.data.preprocess import (crop, nonzero_bbox, prepare_dataset, preprocess_images, remap_labels,
                                     uncrop, unmap_labels)
from passion.data.spec import get_spec
from passion.utils import PassionError

SPEC = get_spec("brats2020")
runner = CliRunner()


def run_cli(*args):
    cli._register()
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture
def raw_copy(synth_raw_dir, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(synth_raw_dir, dst)
    return dst


# ----------------------------------------------------------------------------- pure functions
def test_nonzero_bbox_grows_symmetrically_and_stays_inside():
    vol = np.zeros((2, 40, 30, 20), np.float32)
    vol[0, 10:14, 5:25, 2:4] = 1
    vol[1, 20:22, 6:7, 3:5] = 2
    assert nonzero_bbox(vol, 1) == [[10, 22], [5, 25], [2, 5]]
    box = nonzero_bbox(vol, 16)
    assert box[0] == [8, 24] and box[1] == [5, 25] and box[2] == [0, 16]  # axis 2 shifted inside
    assert nonzero_bbox(vol, 128) == [[0, 40], [0, 30], [0, 20]]
    assert nonzero_bbox(vol, (1, 22, 3)) == [[10, 22], [4, 26], [2, 5]]
    with pytest.raises(PassionError):
        nonzero_bbox(np.zeros((1, 4, 4, 4)), 2)


def test_crop_uncrop_round_trip_is_exact():
    rng = np.random.default_rng(0)
    vol = np.zeros((3, 20, 22, 24), np.float32)
    vol[:, 3:15, 4:20, 5:9] = rng.normal(size=(3, 12, 16, 4))
    box = nonzero_bbox(vol, 6)
    back = uncrop(crop(vol, box), box, vol.shape[1:])
    assert np.array_equal(back, vol)
    labels = (vol[0] > 0).astype(np.uint8)
    assert np.array_equal(uncrop(crop(labels, box), box, labels.shape), labels)
    with pytest.raises(PassionError):
        uncrop(crop(labels, box)[1:], box, labels.shape)


def test_preprocess_images_zscores_brain_and_zeroes_missing():
    rng = np.random.default_rng(1)
    img = np.zeros((4, 24, 24, 24), np.float32)
    brain = np.zeros((24, 24, 24), bool)
    brain[4:20, 5:19, 6:18] = True
    for m in range(4):
        img[m][brain] = rng.normal(100 * (m + 1), 7 * (m + 1), brain.sum())
    out, box = preprocess_images(img, [True, False, True, True], min_size=8)
    assert out.dtype == np.float32 and box == [[4, 20], [5, 19], [6, 18]]
    assert not out[1].any()
    for m in (0, 2, 3):
        v = out[m][out[m] != 0]
        assert abs(v.mean()) < 1e-4 and abs(v.std() - 1) < 1e-3
    out2, _ = preprocess_images(img, [True, True, True, True], min_size=30)
    assert out2.shape == (4, 24, 24, 24) and (out2[:, ~brain] == 0).all()


def test_label_remap_and_inverse():
    raw = np.array([[0, 1], [2, 4]], np.uint8)
    cls = remap_labels(raw, SPEC)
    assert cls.tolist() == [[0, 1], [2, 3]] and cls.dtype == np.uint8
    assert np.array_equal(unmap_labels(cls, SPEC), raw)
    with pytest.raises(PassionError, match="labels 3, 7 are not in the brats2020"):
        remap_labels(np.array([0, 3, 7, 1]), SPEC)
    with pytest.raises(PassionError, match="0.5"):
        remap_labels(np.array([0.0, 0.5]), SPEC)
    with pytest.raises(PassionError, match="classes 5"):
        unmap_labels(np.array([0, 5]), SPEC)


def test_write_label_map_keeps_geometry(tmp_path):
    affine = np.diag([1.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = [10, 20, -5]
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 2:4, 3] = 4
    write_label_map(tmp_path / "x_seg.nii.gz", labels, affine)
    data, img = load_volume(tmp_path / "x_seg.nii.gz", "x")
    assert np.allclose(img.affine, affine) and np.array_equal(data, labels)
    assert img.get_data_dtype() == np.uint8 and not list(tmp_path.glob(".*"))


# ----------------------------------------------------------------------------- prepare
def test_prepare_writes_cache_and_is_idempotent(raw_copy, tmp_path):
    (raw_copy / "Synth_0002" / "Synth_0002_t1ce.nii.gz").unlink()  # genuinely missing modality
    cache = tmp_path / "cache"
    res = run_cli("prepare", raw_copy, cache, "--min-size", "24", "--workers", "2", "--quiet")
    assert res.exit_code == 0, res.output
    assert "3 of 3 cases" in res.output
    index = json.loads((cache / "dataset.json").read_text())
    assert index["spec"]["name"] == "brats2020" and [c["name"] for c in index["cases"]] == [
        "Synth_0001", "Synth_0002", "Synth_0003"]
    assert index["cases"][1]["available"] == [True, False, True, True]
    for entry in index["cases"]:
        name = entry["name"]
        case = cache_mod.read_case(cache, name)
        box, original = case.meta["crop_box"], case.meta["original_shape"]
        assert original == [32, 32, 32] and case.image.shape == (4, *entry["shape"])
        assert all(hi - lo >= 24 for lo, hi in box) and case.image.dtype == np.float32
        assert case.available == entry["available"]
        for m, ok in enumerate(case.available):
            v = case.image[m][case.image[m] != 0]
            if ok:
                assert abs(v.mean()) < 1e-3 and abs(v.std() - 1) < 1e-2
            else:
                assert v.size == 0
        raw_img = nib.load(raw_copy / name / f"{name}_flair.nii.gz")
        assert np.allclose(case.meta["affine"], raw_img.affine)
        assert np.allclose(case.meta["spacing"], raw_img.header.get_zooms())
        # exact inverse: cached classes put back and unmapped give the raw segmentation
        raw_seg = np.asarray(nib.load(raw_copy / name / f"{name}_seg.nii.gz").dataobj)
        assert set(np.unique(case.label)) <= {0, 1, 2, 3}
        assert np.array_equal(unmap_labels(uncrop(case.label, box, original), SPEC), raw_seg)
        flair = np.asarray(raw_img.dataobj)
        assert np.array_equal(uncrop(case.image[0], box, original) != 0, flair != 0)
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "cases").rglob("*")}
    summary = prepare_dataset(raw_copy, cache, SPEC, min_size=24, progress=False)
    assert summary["prepared"] == 0 and summary["already_done"] == 3 and summary["indexed"] == 3
    assert stamps == {p: p.stat().st_mtime_ns for p in (cache / "cases").rglob("*")}


def test_prepare_refuses_other_dataset_in_same_cache(raw_copy, tmp_path):
    cache = tmp_path / "cache"
    prepare_dataset(raw_copy, cache, SPEC, min_size=8, progress=False)
    with pytest.raises(PassionError, match="brats2023"):
        prepare_dataset(raw_copy, cache, get_spec("brats2023"), progress=False)


# ----------------------------------------------------------------------------- bad input
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _write(path: Path, data, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def _good_case(raw: Path, name: str, shape=(12, 12, 12)) -> None:
    rng = np.random.default_rng(0)
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    for m in SPEC.suffixes:
        _write(raw / name / f"{name}_{m}.nii.gz", np.where(brain, rng.uniform(1, 2, shape), 0).astype(np.float32))
    seg = np.zeros(shape, np.uint8)
    seg[5:7, 5:7, 5:7] = 4
    seg[4, 5:7, 5:7] = 2
    _write(raw / name / f"{name}_seg.nii.gz", seg)


def _break(kind: str, case: Path) -> str:
    """Make one case bad; returns the file name the error must mention."""
    name = case.name
    if kind == "no_modality":
        for m in SPEC.suffixes:
            (case / f"{name}_{m}.nii.gz").unlink()
        return name
    if kind == "shape":
        _write(case / f"{name}_t1.nii.gz", np.ones((12, 12, 11), np.float32))
        return f"{name}_t1.nii.gz"
    if kind == "affine":
        moved = AFFINE.copy()
        moved[0, 3] = 1.0
        _write(case / f"{name}_t2.nii.gz", np.ones((12, 12, 12), np.float32), moved)
        return f"{name}_t2.nii.gz"
    if kind == "not_3d":
        _write(case / f"{name}_flair.nii.gz", np.ones((12, 12, 12, 2), np.float32))
        return f"{name}_flair.nii.gz"
    if kind == "nan":
        data = np.ones((12, 12, 12), np.float32)
        data[3, 3, 3] = np.nan
        data[4, 4, 4] = np.inf
        _write(case / f"{name}_t1ce.nii.gz", data)
        return f"{name}_t1ce.nii.gz"
    if kind == "labels":
        seg = np.zeros((12, 12, 12), np.uint8)
        seg[5, 5, 5] = 3
        _write(case / f"{name}_seg.nii.gz", seg)
        return f"{name}_seg.nii.gz"
    if kind == "corrupt":
        (case / f"{name}_t1ce.nii.gz").write_bytes(b"\x1f\x8b\x08this is not a nifti file")
        return f"{name}_t1ce.nii.gz"
    if kind == "truncated":
        path = case / f"{name}_t2.nii.gz"
        path.write_bytes(path.read_bytes()[:200])
        return f"{name}_t2.nii.gz"
    raise AssertionError(kind)


BAD_KINDS = ["no_modality", "shape", "affine", "not_3d", "nan", "labels", "corrupt", "truncated"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_fails_with_one_line_naming_case_and_file(kind, tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    _good_case(raw, "Case_A")
    _good_case(raw, "Case_B")
    needle = _break(kind, raw / "Case_B")
    with pytest.raises(PassionError) as info:  # strict: grids that differ are refused, not resampled
        prepare_dataset(raw, cache, SPEC, min_size=4, progress=False, strict=True)
    msg = str(info.value)
    assert "Case_B" in msg and needle in msg and "\n" not in msg
    assert not cache_mod.case_dir(cache, "Case_B").exists()
    assert not (cache / "dataset.json").exists()
    # skip mode: the good case is cached, the bad one is reported and indexed as failed
    summary = prepare_dataset(raw, cache, SPEC, on_error="skip", min_size=4, progress=False, strict=True)
    assert [f["name"] for f in summary["failed"]] == ["Case_B"] and summary["indexed"] == 1
    index = cache_mod.read_index(cache)
    assert [c["name"] for c in index["cases"]] == ["Case_A"] and index["failed"][0]["name"] == "Case_B"
    assert not cache_mod.case_dir(cache, "Case_B").exists()


def test_bad_case_with_workers_and_cli(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    for name in ("Case_A", "Case_B", "Case_C"):
        _good_case(raw, name)
    _break("nan", raw / "Case_C")
    with pytest.raises(PassionError, match="Case_C.*Case_C_t1ce.nii.gz"):
        prepare_dataset(raw, cache, SPEC, workers=2, min_size=4, progress=False)
    assert not cache_mod.case_dir(cache, "Case_C").exists()
    res = run_cli("prepare", raw, cache, "--on-error", "skip", "--min-size", "4", "--workers", "2", "--quiet")
    assert res.exit_code == 0 and "2 of 3 cases" in res.output
    res = run_cli("prepare", raw, cache, "--on-error", "maybe")
    assert isinstance(res.exception, PassionError)


def test_no_cases_found(tmp_path):
    (tmp_path / "raw" / "notes").mkdir(parents=True)
    (tmp_path / "raw" / "readme.txt").write_text("x")
    with pytest.raises(PassionError, match="no cases found"):
        prepare_dataset(tmp_path / "raw", tmp_path / "cache", SPEC, progress=False)
    with pytest.raises(PassionError, match="no such directory"):
        prepare_dataset(tmp_path / "missing", tmp_path / "cache", SPEC, progress=False)
    assert not (tmp_path / "cache").exists()


def test_interrupted_write_leaves_no_half_case(tmp_path, monkeypatch):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    _good_case(raw, "Case_A")
    real_save = np.save

    def failing_save(f, arr, *a, **k):
        if arr.dtype == np.uint8:
            raise OSError("disk full")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(OSError):
        prepare_dataset(raw, cache, SPEC, min_size=4, progress=False)
    assert not cache_mod.case_dir(cache, "Case_A").exists()
    monkeypatch.undo()
    assert prepare_dataset(raw, cache, SPEC, min_size=4, progress=False)["prepared"] == 1


def test_nii_extension_and_label_free_case(tmp_path):
    raw = tmp_path / "raw"
    _write(raw / "P1" / "P1_t2.nii", np.pad(np.ones((6, 6, 6), np.float32), 3))
    summary = prepare_dataset(raw, tmp_path / "cache", SPEC, min_size=4, progress=False)
    case = cache_mod.read_case(tmp_path / "cache", "P1")
    assert summary["indexed"] == 1 and case.label is None and case.available == [False, False, False, True]
    assert case.image.shape == (4, 6, 6, 6)
