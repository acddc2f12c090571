"""Phantoms: layout, labels, MRI-like contrasts, determinism, drop rates, bad arguments."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from passion import cli
from passion.cli.data import parse_rates
from passion.data.spec import get_spec
from passion.data.synthetic import draw_available, synthesize_case, synthesize_dataset
from passion.utils import PassionError

SPEC = get_spec("brats2020")
runner = CliRunner()


def run_cli(*args: str):
    cli._register()
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth64") / "raw"
    res = run_cli("synth", out, "--cases", "4", "--shape", "64", "64", "64", "--seed", "5", "--workers", "2")
    assert res.exit_code == 0, res.output
    return out


def test_cli_writes_brats_layout(synth64):
    files = sorted(synth64.rglob("*.nii.gz"))
    assert len(files) == 20
    cases = sorted(p.name for p in synth64.iterdir() if p.is_dir())
    assert cases == ["Synth_0001", "Synth_0002", "Synth_0003", "Synth_0004"]
    for case in cases:
        seg = nib.load(synth64 / case / f"{case}_seg.nii.gz")
        assert seg.get_data_dtype() == np.uint8
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= {0, 1, 2, 4} and {1, 2} <= values
        img = nib.load(synth64 / case / f"{case}_flair.nii.gz")
        assert img.shape == (64, 64, 64) and img.get_data_dtype() == np.float32
        assert np.allclose(img.header.get_zooms(), 240 / 64)
        assert np.allclose(img.affine, seg.affine)
    meta = json.loads((synth64 / "synth.json").read_text())
    assert meta["cases"] == 4 and meta["seed"] == 5 and len(meta["case_info"]) == 4


def _ratio(img, region, wm):
    return float(img[region].mean() / img[wm].mean())


def test_modalities_carry_different_information(synth64):
    checked_rim = 0
    for i in range(4):
        case = synthesize_case(i, (64, 64, 64), 5)  # same seed: also the tissue maps
        name = case.name
        seg = np.asarray(nib.load(synth64 / name / f"{name}_seg.nii.gz").dataobj)
        assert np.array_equal(seg, case.seg)
        img = {m: np.asarray(nib.load(synth64 / name / f"{name}_{m}.nii.gz").dataobj) for m in SPEC.modalities}
        wm = (case.tissue["wm"] > 0.8) & (seg == 0)
        csf = (case.tissue["csf"] > 0.7) & (seg == 0)
        edema = seg == 2
        assert wm.sum() > 100 and csf.sum() > 20 and edema.sum() > 20
        assert _ratio(img["flair"], edema, wm) > 1.5 and _ratio(img["t2"], edema, wm) > 1.5
        assert _ratio(img["t1"], edema, wm) < 0.9
        assert _ratio(img["flair"], csf, wm) < 0.7 and _ratio(img["t2"], csf, wm) > 1.5
        assert _ratio(img["t1"], csf, wm) < 0.7
        rim = seg == 4
        if rim.sum() >= 10:
            checked_rim += 1
            t1ce, t1 = _ratio(img["t1ce"], rim, wm), _ratio(img["t1"], rim, wm)
            assert t1ce > 1.2 and t1ce > 1.5 * t1
    assert checked_rim >= 1


def test_deterministic_by_seed_and_workers(tmp_path):
    a, b = synthesize_case(2, (32, 32, 32), 7), synthesize_case(2, (32, 32, 32), 7)
    assert np.array_equal(a.seg, b.seg) and all(np.array_equal(a.images[m], b.images[m]) for m in a.images)
    other = synthesize_case(2, (32, 32, 32), 8)
    assert not np.array_equal(a.images["t1"], other.images["t1"])
    brain0 = synthesize_case(0, (32, 32, 32), 7).images["t1"] > 0
    assert not np.array_equal(brain0, a.images["t1"] > 0)  # per-case anatomy jitter
    for workers in (1, 2):
        synthesize_dataset(tmp_path / f"w{workers}", 2, (32, 32, 32), 7, workers=workers, progress_bar=False)
    for path in sorted((tmp_path / "w1").rglob("*.nii.gz")):
        other_path = tmp_path / "w2" / path.relative_to(tmp_path / "w1")
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(other_path).dataobj))


def test_drop_rates_make_files_missing_but_never_all(tmp_path):
    rates = {"flair": 0.6, "t1ce": 0.4}
    draws = np.array([draw_available(1, i, SPEC, rates) for i in range(400)])
    assert draws.any(axis=1).all()
    assert abs(1 - draws[:, 0].mean() - 0.6) < 0.08 and abs(1 - draws[:, 1].mean() - 0.4) < 0.08
    assert draws[:, 2].all() and draws[:, 3].all()
    heavy = {m: 0.9 for m in SPEC.modalities}
    assert np.array([draw_available(1, i, SPEC, heavy) for i in range(200)]).any(axis=1).all()
    out = tmp_path / "raw"
    res = run_cli("synth", out, "--cases", "4", "--shape", "32", "32", "32", "--seed", "2", "--workers", "1",
                  "--drop-rates", "flair=0.9,t1ce=0.9,t1=0.9,t2=0.5")
    assert res.exit_code == 0, res.output
    for case in sorted(p for p in out.iterdir() if p.is_dir()):
        present = [m for m in SPEC.modalities if (case / f"{case.name}_{m}.nii.gz").exists()]
        assert 1 <= len(present) <= 4 and (case / f"{case.name}_seg.nii.gz").exists()
    assert len(list(out.rglob("*.nii.gz"))) < 4 * 5


def test_refuses_non_empty_output_without_force(tmp_path):
    out = tmp_path / "raw"
    assert run_cli("synth", out, "--cases", "2", "--shape", "32", "32", "32", "--workers", "1").exit_code == 0
    res = run_cli("synth", out, "--cases", "1", "--shape", "32", "32", "32")
    assert isinstance(res.exception, PassionError) and "--force" in str(res.exception)
    res = run_cli("synth", out, "--cases", "1", "--shape", "32", "32", "32", "--force",
                  "--drop-rates", "t2=0.99", "--seed", "4")
    assert res.exit_code == 0, res.output
    assert not (out / "Synth_0002").exists()  # no mix of two phantom sets
    info = json.loads((out / "synth.json").read_text())["case_info"][0]
    files = {p.name for p in (out / "Synth_0001").iterdir()}
    expected = {f"Synth_0001_{m}.nii.gz" for m, ok in zip(SPEC.suffixes, info["available"]) if ok}
    assert files == expected | {"Synth_0001_seg.nii.gz"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("text, needle", [
    ("flair", "name=value"), ("bogus=0.1", "unknown modality"), ("flair=abc", "not a number"),
    ("flair=1.0", "[0, 1)"), ("flair=-0.1", "[0, 1)"), ("flair=0.1,flair=0.2", "twice"),
    ("flair=__import__('os')", "not a number"),
])
def test_bad_drop_rates_are_one_line_errors(text, needle):
    with pytest.raises(PassionError, match=None) as info:
        parse_rates(text, SPEC.modalities)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_parse_rates_and_bad_cli_values(tmp_path):
    assert parse_rates(" flair=0.6, T1CE=.4 ,", SPEC.modalities) == {"flair": 0.6, "t1ce": 0.4}
    assert parse_rates("", SPEC.modalities) == {}
    for args in (["--cases", "0"], ["--shape", "8", "32", "32"], ["--dataset", "nope"]):
        res = run_cli("synth", tmp_path / "x", *args)
        assert isinstance(res.exception, PassionError), res.output
