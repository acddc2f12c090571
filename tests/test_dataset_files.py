"""Dataset description files: the shipped presets, checks with one-line errors, and a 3-modality dataset
with its own labels and regions end to end (synth -> prepare -> split -> train -> evaluate -> predict)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from passion.cli import _register, app
from passion.data.description import load_description, preset_names, spec_to_description, write_description
from passion.data.spec import DatasetSpec, get_spec
from passion.utils import PassionError

GLIOMA3 = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "glioma3.yaml"
_register()
runner = CliRunner()


def cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def test_presets_are_shipped_description_files(tmp_path):
    assert {"brats2020", "brats2023", "myops2020"} <= set(preset_names())
    for name in preset_names():
        spec = get_spec(name)
        write_description(tmp_path / f"{name}.yaml", spec)
        assert load_description(tmp_path / f"{name}.yaml") == spec
        assert DatasetSpec.from_dict(spec.to_dict()) == spec
    brats = get_spec("brats2020")
    assert brats.label_map == {0: 0, 1: 1, 2: 2, 4: 3} and brats.regions == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    for alias, modality in (("T2f", "flair"), ("FLAIR", "flair"), ("t1gd", "t1ce"), ("T1c", "t1ce"),
                            ("T1n", "t1"), ("t1w", "t1"), ("T2W", "t2")):
        assert brats.modalities[brats.match_modality(alias)] == modality
    assert get_spec("brats2023").match_modality("flair") == 0


def test_spec_saved_before_aliases_gets_its_presets():
    d = get_spec("brats2020").to_dict()
    for key in ("modality_aliases", "class_aliases", "region_aliases"):
        d.pop(key)
    assert DatasetSpec.from_dict(d).match_modality("t2f") == 0


def test_glioma3_description():
    spec = get_spec(str(GLIOMA3))
    assert spec.name == "glioma3" and spec.modalities == ("flair", "t1post", "t2")
    assert spec.class_names == ("background", "oedema", "necrosis", "active")
    assert spec.label_map == {0: 0, 10: 1, 20: 2, 30: 3}
    assert spec.regions == {"lesion": (1, 2, 3), "active": (3,), "inactive": (1, 2)}
    assert spec.postprocess_region == "active" and spec.postprocess_min_volume_mm3 == 200
    assert len(spec.subsets()) == 7


@pytest.mark.parametrize("change, message", [
    ({"labels": {1: "a", 0: "background"}}, "raw label 0 must be the first class"),
    ({"regions": {"x": ["nope"]}}, "region x: nope is not a foreground class"),
    ({"regions": {"x": ["background"]}}, "is not a foreground class"),
    ({"modalities": {"a": "S", "b": "s"}}, "file suffix 's' is empty or used twice"),
    ({"postprocess": {"region": "zz"}}, "postprocess needs"),
    ({"dimensions": 4}, "dimensions must be 2 or 3"),
    ({"colour": 1}, "unknown key(s) colour"),
    ({"labels": {0: "background", "x": "a"}}, "label value 'x' is not an integer"),
])
def test_bad_description_is_one_line_naming_the_file(tmp_path, change, message):
    base = {"name": "d", "modalities": {"a": "A", "b": "B"}, "labels": {0: "background", 1: "les"},
            "regions": {"les": ["les"]}}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**base, **change}))
    with pytest.raises(PassionError) as err:
        load_description(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)
    result = runner.invoke(app, ["synth", str(tmp_path / "out"), "--dataset", str(path)])
    assert result.exit_code != 0 and message in str(result.exception)


def test_description_round_trips_through_json(tmp_path):
    spec = get_spec(str(GLIOMA3))
    path = tmp_path / "g.json"
    path.write_text(json.dumps(spec_to_description(spec)))
    assert get_spec(str(path)) == spec


def test_glioma3_end_to_end(tmp_path):
    """A 3-modality dataset with labels 10/20/30 and regions lesion/active/inactive, through the CLI."""
    raw, cache, split, run = tmp_path / "raw", tmp_path / "cache", tmp_path / "split", tmp_path / "run"
    cli("synth", raw, "--dataset", GLIOMA3, "--cases", 4, "--shape", 32, 32, 32, "--seed", 2, "--workers", 1,
        "--drop-rates", "t2=0.3")
    case = raw / "Synth_0001"
    assert sorted(p.name for p in case.iterdir())[-1] == "Synth_0001_mask.nii.gz"
    assert set(np.unique(np.asarray(nib.load(str(case / "Synth_0001_mask.nii.gz")).dataobj))) <= {0, 10, 20, 30}
    cli("prepare", raw, cache, "--dataset", GLIOMA3, "--min-size", 32, "--quiet")
    index = json.loads((cache / "dataset.json").read_text())
    assert index["spec"]["name"] == "glioma3" and len(index["cases"]) == 4
    label = np.load(cache / "cases" / "Synth_0001" / "label.npy")
    assert set(np.unique(label)) <= {0, 1, 2, 3} and (label > 0).any()
    desc = json.loads(cli("split", cache, "--out", split, "--test", 0.25, "--val", 0, "--missing-rates",
                          "flair=0.3", "--json").stdout)
    assert set(desc["present"]) == {"flair", "t1post", "t2"} and desc["cases"] == 3
    from passion.demo import DEMO_CONFIG

    sets = [f"run_dir={run}", f"data.cache={cache}", f"data.split={split}", "model.patch_size=[32,32,32]",
            "model.base_width=4", "train.epochs=2", "train.iters_per_epoch=2", "train.batch_size=1",
            "train.threads=1", "train.precision=fp32", "train.device=cpu", "data.workers=0"]
    cli("train", "--config", DEMO_CONFIG, *[a for s in sets for a in ("--set", s)])
    cli("evaluate", run, "--no-progress")
    results = json.loads((run / "eval" / "test" / "results.json").read_text())
    assert results["dataset"] == "glioma3" and len(results["subsets"]) == 7
    assert set(results["mean"]["dice"]) == {"lesion", "active", "inactive", "activepost"}
    test_case = (split / "test.txt").read_text().split()[0]
    out = tmp_path / "pred"
    cli("predict", "--checkpoint", run, "--output", out, "--no-progress", raw / test_case)
    pred = nib.load(str(out / f"{test_case}.nii.gz"))
    ref = nib.load(str(next((raw / test_case).glob("*_FLAIR.nii.gz"))))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 10, 20, 30}
