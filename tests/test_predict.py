"""`predict` on new NIfTI cases with missing modality files, and its failure modes."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from passion.data.cache import write_index
from passion.data.spec import get_spec
from passion.utils import PassionError

from geometry_helpers import write_case as write_volumes
from oracle import oracle_checkpoint

SPEC = get_spec("brats2020")
SHAPE = (30, 28, 26)
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 120.0], [0, 0, 1.5, -70.0], [0, 0, 0, 1]])


pytestmark = pytest.mark.usefixtures("one_thread")


# A uniform brain (100) holding a bright asymmetric L (1000): z-scored, only the L is above 0.5, so the
# oracle backbone (tests/oracle.py) predicts enhancing tumour (raw label 4) exactly there and background
# elsewhere. An all-zero, shifted or flipped output fails the tests below.
BRAIN = np.zeros(SHAPE, bool)
BRAIN[5:25, 4:22, 3:20] = True
STRUCTURE = np.zeros(SHAPE, bool)
STRUCTURE[9:13, 7:15, 6:9] = True
STRUCTURE[9:11, 7:9, 9:15] = True
EXPECTED = np.where(STRUCTURE, 4, 0)
IMAGE = np.where(STRUCTURE, 1000.0, np.where(BRAIN, 100.0, 0.0)).astype(np.float32)


def make_checkpoint(root, eval_results: dict | None = None):
    """An oracle run over a cache whose index gives predict its crop minimum."""
    cache = root / "cache"
    write_index(cache, SPEC, [], {"min_size": 16})
    path = oracle_checkpoint(root, SPEC, [16, 16, 16], cache)
    if eval_results is not None:
        (root / "run" / "eval" / "test").mkdir(parents=True)
        (root / "run" / "eval" / "test" / "results.json").write_text(json.dumps(eval_results))
    return path


def write_case(root, name, modalities=("flair", "t2"), label=True):
    """A case folder with the phantom in each of `modalities` (and an empty label file)."""
    volumes = {m: IMAGE for m in modalities}
    if label:
        volumes["seg"] = np.zeros(SHAPE, np.float32)
    return write_volumes(root, name, volumes, AFFINE)


def _listing(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_predict_case_missing_two_modalities(tmp_path):
    import passion

    results = {"split": "test", "cases": ["a", "b"], "modalities": list(SPEC.modalities),
               "subsets": [{"modalities": ["flair", "t2"], "dice": {"WT": 0.81, "TC": 0.55, "ET": 0.4}},
                           {"modalities": list(SPEC.modalities), "dice": {"WT": 0.9, "TC": 0.8, "ET": 0.7}}],
               "mean": {"dice": {"WT": 0.85, "TC": 0.7, "ET": 0.6}}}
    ckpt = make_checkpoint(tmp_path, results)
    case = write_case(tmp_path / "raw", "BraTS_007")
    out = tmp_path / "out"
    messages = []
    written = passion.predict(ckpt, [case], out, progress=False, log=messages.append)
    assert written == [out / "BraTS_007.nii.gz"]
    assert _listing(out) == ["BraTS_007.nii.gz"]
    img = nib.load(str(written[0]))
    src = nib.load(str(case / "BraTS_007_flair.nii.gz"))
    assert img.shape == SHAPE and np.allclose(img.affine, src.affine)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), EXPECTED)
    text = "\n".join(messages)
    assert "using flair, t2" in text and "missing: t1ce, t1" in text
    assert "WT 0.810" in text and "all modalities" in text


def test_predict_folder_of_cases_with_probabilities_and_files(tmp_path):
    from passion.engine.predict import predict

    ckpt = make_checkpoint(tmp_path)
    raw = tmp_path / "raw"
    write_case(raw, "c1", modalities=("t1ce",))
    write_case(raw, "c2", modalities=("flair", "t1ce", "t1", "t2"), label=False)
    out = tmp_path / "out"
    written = predict(ckpt, [raw], out, save_probabilities=True, progress=False, log=None)
    assert [p.name for p in written] == ["c1.nii.gz", "c2.nii.gz", "c1_probs.nii.gz", "c2_probs.nii.gz"]
    probs = np.asarray(nib.load(str(out / "c2_probs.nii.gz")).dataobj)
    assert probs.shape == (*SHAPE, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    labels = np.asarray(nib.load(str(out / "c2.nii.gz")).dataobj)
    raw_of_class = np.array([0, 1, 2, 4])
    np.testing.assert_array_equal(labels, raw_of_class[probs.argmax(-1)])
    np.testing.assert_array_equal(labels, EXPECTED)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "c1.nii.gz")).dataobj), EXPECTED)

    # explicit per-modality files; the case name comes from the file names
    single = write_case(tmp_path / "raw2", "P01", modalities=("t1", "t2"))
    files = {"T1": single / "P01_t1.nii.gz", "t2": single / "P01_t2.nii.gz"}
    got = predict(ckpt, [], tmp_path / "out2", files=files, progress=False, log=None)
    assert [p.name for p in got] == ["P01.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(str(got[0])).dataobj), EXPECTED)
    with pytest.raises(PassionError, match="already exists"):
        predict(ckpt, [], tmp_path / "out2", files=files, progress=False, log=None)
    predict(ckpt, [], tmp_path / "out2", files=files, progress=False, log=None, overwrite=True)


def test_crop_uncrop_round_trip_exact():
    from passion.data.preprocess import crop, nonzero_bbox, preprocess_images, uncrop

    rng = np.random.default_rng(0)
    vol = np.zeros((2, 40, 36, 30), np.float32)
    vol[:, 6:31, 3:20, 10:29] = rng.normal(size=(2, 25, 17, 19))
    box = nonzero_bbox(vol, 8)
    assert box == [[6, 31], [3, 20], [10, 29]]
    np.testing.assert_array_equal(uncrop(crop(vol, box), box, vol.shape[1:]), vol)
    np.testing.assert_array_equal(uncrop(crop(vol[0], box), box, vol.shape[1:]), vol[0])
    img, box2 = preprocess_images(vol, [True, False], 32)  # grown to the minimum size
    assert img.shape[1:] == tuple(hi - lo for lo, hi in box2) and (img[1] == 0).all()
    labels = (rng.random(vol.shape[1:]) > 0.5).astype(np.uint8) * (vol[0] != 0)
    np.testing.assert_array_equal(uncrop(crop(labels, box2), box2, labels.shape), labels)


def test_predict_bad_inputs_leave_nothing(tmp_path):
    from passion.engine.predict import predict

    ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "out"
    kw = dict(progress=False, log=None)

    only_label = write_case(tmp_path / "a", "x", modalities=())
    with pytest.raises(PassionError, match="no modality file"):
        predict(ckpt, [only_label], out, **kw)

    shapes = write_case(tmp_path / "b", "y", modalities=("flair",))
    nib.save(nib.Nifti1Image(np.ones((30, 28, 25), np.float32), AFFINE), str(shapes / "y_t2.nii.gz"))
    with pytest.raises(PassionError, match="shape"):  # strict: other grids are refused, not resampled
        predict(ckpt, [shapes], out, strict=True, **kw)

    moved = write_case(tmp_path / "c", "z", modalities=("flair",))
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), shifted), str(moved / "z_t1.nii.gz"))
    with pytest.raises(PassionError, match="affine"):
        predict(ckpt, [moved], out, strict=True, **kw)

    good = write_case(tmp_path / "d", "good")
    with pytest.raises(PassionError, match="unknown modality"):
        predict(ckpt, [], out, files={"pd": good / "good_flair.nii.gz"}, **kw)
    with pytest.raises(PassionError, match="not found"):
        predict(ckpt, [], out, files={"flair": good / "nope.nii.gz"}, **kw)

    bogus = tmp_path / "bogus.pt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(PassionError, match="not a passion checkpoint"):
        predict(bogus, [good], out, **kw)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(PassionError):
        predict(tmp_path / "text.pt", [good], out, **kw)

    # the second case fails only when its voxels are read (NaN): the first must not be left in OUT
    raw = tmp_path / "e"
    write_case(raw, "a_ok")
    bad = write_case(raw, "b_nan", modalities=("t2",))
    arr = np.ones(SHAPE, np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, AFFINE), str(bad / "b_nan_t2.nii.gz"))
    with pytest.raises(PassionError, match="NaN"):
        predict(ckpt, [raw], out, **kw)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PassionError, match="NaN"):
        predict(ckpt, [raw], out, **kw)
    assert _listing(out) == ["keep.txt"]


def test_cli_predict(tmp_path):
    from typer.testing import CliRunner

    from passion.cli import _register, app

    _register()
    ckpt = make_checkpoint(tmp_path)
    case = write_case(tmp_path / "raw", "Q9", modalities=("flair", "t2"))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["predict", "--checkpoint", str(ckpt), "--output", str(out), "--no-progress",
                                 "--t2", str(case / "Q9_t2.nii.gz"), "--modality", f"flair={case / 'Q9_flair.nii.gz'}"])
    assert r.exit_code == 0, r.output
    assert "using flair, t2" in r.output
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "Q9.nii.gz")).dataobj), EXPECTED)
    r = CliRunner().invoke(app, ["predict", "--checkpoint", str(ckpt), "--output", str(out), str(case),
                                 "--no-progress", "--overwrite", "--probabilities"])
    assert r.exit_code == 0, r.output
    assert _listing(out) == ["Q9.nii.gz", "Q9_probs.nii.gz"]
