"""Target spacing: `prepare` resamples every case onto one spacing and records it; `predict` brings an
input of any spacing onto the model's and the prediction back onto the input's own grid."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from passion.data import cache as cache_mod
from passion.data.geometry import grid_map, voxel_spacing
from passion.data.preprocess import prepare_dataset
from passion.engine.predict import predict
from passion.utils import PassionError

from geometry_helpers import BRATS, checkpoint, grid_affine, phantom, write_case
from oracle import ORACLE


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args):
    from passion import cli

    cli._register()
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _native(raw):
    case = sorted(p for p in raw.iterdir() if p.is_dir())[0]
    img = nib.load(str(next(case.glob("*_flair.nii.gz"))))
    return img.shape, img.affine


def test_prepare_default_spacing_is_the_median_and_changes_nothing(tmp_path, synth_raw_dir):
    shape, affine = _native(synth_raw_dir)
    prepare_dataset(synth_raw_dir, tmp_path / "cache", BRATS, min_size=8, progress=False)
    index = cache_mod.read_index(tmp_path / "cache")
    assert np.allclose(index["spacing"], voxel_spacing(affine)) and index["orientation"] == "RAS"
    meta = cache_mod.read_case(tmp_path / "cache", index["cases"][0]["name"]).meta
    assert meta["grid_shape"] == list(shape) and np.allclose(meta["spacing"], voxel_spacing(affine))


def test_prepare_with_spacing_records_it_and_resamples(tmp_path, synth_raw_dir):
    shape, affine = _native(synth_raw_dir)
    native = np.array(voxel_spacing(affine))
    target = [float(v) for v in native * [2.0, 1.0, 0.5]]
    cache = tmp_path / "cache"
    res = run_cli("prepare", synth_raw_dir, cache, "--spacing", *target, "--min-size", 8, "--quiet")
    assert res.exit_code == 0, res.output
    assert "mm, RAS" in res.output
    index = json.loads((cache / "dataset.json").read_text())
    assert np.allclose(index["spacing"], target) and index["orientation"] == "RAS"
    expected = [round(n * s / t) for n, s, t in zip(shape, native, target)]
    for entry in index["cases"]:
        case = cache_mod.read_case(cache, entry["name"])
        assert case.meta["grid_shape"] == expected == [shape[0] // 2, shape[1], shape[2] * 2]
        assert np.allclose(case.meta["spacing"], target)
        assert case.label.shape == case.image.shape[1:] == tuple(entry["shape"])
        assert set(np.unique(case.label)) <= {0, 1, 2, 3}
        # the tumour volume in mm^3 survives the resampling (one-hot linear labels; a 72-voxel tumour: 25 %)
        raw_seg = np.asarray(nib.load(str(synth_raw_dir / entry["name"] / f"{entry['name']}_seg.nii.gz")).dataobj)
        assert abs((case.label > 0).sum() * np.prod(target) - (raw_seg > 0).sum() * np.prod(native)) \
            <= 0.25 * (raw_seg > 0).sum() * np.prod(native)
    # the same cache cannot be continued at another spacing
    with pytest.raises(PassionError, match="use another cache directory"):
        prepare_dataset(synth_raw_dir, cache, BRATS, min_size=8, progress=False, spacing=list(native))


def test_prepare_refuses_a_bad_spacing(tmp_path, synth_raw_dir):
    with pytest.raises(PassionError, match="positive"):
        prepare_dataset(synth_raw_dir, tmp_path / "cache", BRATS, min_size=8, progress=False, spacing=[1, 0, 1])


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.5, 2.0, 0.8)])
def test_predict_resamples_to_the_model_spacing_and_back(tmp_path, spacing):
    """The model (an oracle) works at 1 mm; a scan at another spacing comes back on its own grid with
    the structure where the world phantom has it (up to one voxel of partial volume at its border)."""
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[1.0, 1.0, 1.0], orientation="RAS")
    shape = tuple(int(np.ceil(40 / s)) for s in spacing)
    affine = grid_affine(spacing, origin=(0.3, -0.2, 0.1))
    volumes, structure = phantom(shape, affine)
    case = write_case(tmp_path / "raw", "aniso", volumes, affine)
    out = predict(ckpt, [case], output_dir=tmp_path / "out", progress=False, log=None)
    assert out == [tmp_path / "out" / "aniso.nii.gz"]
    img = nib.load(str(out[0]))
    labels = np.asarray(img.dataobj)
    assert img.shape == shape and np.allclose(img.affine, affine)
    et = labels == 4
    assert _dice(et, structure) >= 0.85
    assert et[ndimage.binary_erosion(structure)].all()  # the interior is found ...
    assert not (labels > 0)[~ndimage.binary_dilation(structure)].any()  # ... and nothing away from it


def test_predict_without_resampling_is_exact_and_old_checkpoints_keep_the_native_grid(tmp_path):
    shape, affine = (20, 20, 16), grid_affine((2.0, 2.0, 2.0))
    volumes, structure = phantom(shape, affine)
    case = write_case(tmp_path / "raw", "native", volumes, affine)
    said = []
    for i, (sp, codes) in enumerate([([2.0, 2.0, 2.0], "RAS"), (None, None)]):
        ckpt = checkpoint(tmp_path / f"m{i}", ORACLE, spacing=sp, orientation=codes)
        out = predict(ckpt, [case], output_dir=tmp_path / f"out{i}", progress=False, log=said.append)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out[0])).dataobj), np.where(structure, 4, 0))
    assert sum("records no training spacing" in m for m in said) == 1


def test_grid_map_round_trip_keeps_the_field_of_view():
    affine = grid_affine((1.5, 2.0, 0.8), origin=(5.0, -3.0, 2.0))
    gm = grid_map((10, 8, 20), affine, spacing=[1.0, 1.0, 1.0], orientation="RAS")
    assert gm.shape == (15, 16, 16)
    def corners(a, n):  # the outer faces of the first and the last voxel
        return a @ np.array([-0.5, -0.5, -0.5, 1.0]), a @ np.array([*(np.array(n) - 0.5), 1.0])

    for a, b in zip(corners(affine, (10, 8, 20)), corners(gm.affine, gm.shape)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    assert gm.back(gm.images(np.ones((1, 10, 8, 20), np.float32))).shape == (1, 10, 8, 20)


def test_training_records_the_cache_grid_in_its_checkpoints(tiny_data, tmp_path):
    from passion.config import load_config
    from passion.engine.checkpoint import load_checkpoint, preprocess_of
    from passion.engine.trainer import train

    from training_helpers import tiny_overrides

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.epochs": 1, "train.iters_per_epoch": 1})))
    index = cache_mod.read_index(tiny_data / "cache")
    record = preprocess_of(load_checkpoint(run / "checkpoints" / "last.pt"))
    assert record == {"min_size": 32, "spacing": index["spacing"], "orientation": index["orientation"]}


def test_an_old_cache_keeps_native_grids_with_one_warning(tmp_path, synth_raw_dir, capsys):
    cache = tmp_path / "cache"
    prepare_dataset(synth_raw_dir, cache, BRATS, min_size=8, progress=False)
    index = json.loads((cache / "dataset.json").read_text())
    for key in ("spacing", "orientation"):
        del index[key]
    (cache / "dataset.json").write_text(json.dumps(index))
    for meta_path in cache.glob("cases/*/meta.json"):  # as written before grids were recorded
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("grid", "orientation", "grid_shape")}))
    capsys.readouterr()
    assert prepare_dataset(synth_raw_dir, cache, BRATS, min_size=8, progress=False)["grid"] is None
    assert capsys.readouterr().err.count("before spacing and orientation were recorded") == 1
    with pytest.raises(PassionError, match="native grid"):
        prepare_dataset(synth_raw_dir, cache, BRATS, min_size=8, progress=False, spacing=[1.0, 1.0, 1.0])


def test_2d_datasets_never_resample_across_slices():
    gm = grid_map((64, 48, 6), grid_affine((2.5, 2.5, 10.0)), spacing=[1.25, 1.25, 8.0], orientation="RAS",
                  keep_last_axis=True)
    assert gm.shape == (128, 96, 6) and np.allclose(gm.spacing, [1.25, 1.25, 10.0])
