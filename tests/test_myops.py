"""MyoPS 2020 (2D cardiac, 3 modalities, 6 classes): spec, phantoms, prepare, 357 split, 2D forward,
and a tiny end-to-end 2D run (synth -> prepare -> split -> train -> evaluate -> predict)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from passion.data.nifti import write_label_map, write_nifti
from passion.data.spec import DatasetSpec, get_spec
from passion.models import build_model
from passion.utils import PassionError

SPEC = get_spec("myops2020")
RAW_VALUES = (0, 200, 500, 600, 1220, 2221)


def test_spec_preset():
    assert SPEC.modalities == ("c0", "de", "t2") and SPEC.suffixes == ("C0", "DE", "T2")
    assert SPEC.label_suffix == "gd" and SPEC.spatial_dims == 2 and SPEC.volume_dims == 3
    assert sorted(SPEC.label_map) == list(RAW_VALUES) and sorted(SPEC.label_map.values()) == list(range(6))
    assert SPEC.regions == {"LV": (2,), "RV": (3,), "MYO": (1, 4, 5)} and SPEC.postprocess_region is None
    assert len(SPEC.subsets()) == 7 and SPEC.crop_size == (256, 256)
    assert DatasetSpec.from_dict(SPEC.to_dict()) == SPEC
    assert "crop_size" not in get_spec("brats2020").to_dict()  # BraTS specs serialise as before


@pytest.mark.parametrize("name", ["rfnet", "mmformer"])
def test_2d_forward_every_subset(name):
    torch.manual_seed(0)
    model = build_model(name, num_modalities=3, num_classes=6, base_width=4, patch_size=(32, 32),
                        spatial_dims=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for mask in SPEC.subsets():
            m = torch.tensor([mask])
            out = model.fuse(model.encode(x, m), m)
            assert out.logits.shape == (1, 6, 32, 32), (name, mask)
            assert torch.isfinite(out.logits).all()


def test_phantom_contrast_and_labels():
    from passion.data.synthetic_myops import synthesize_case

    # contrast of a tissue against normal myocardium, in units of the image's standard deviation
    # (as the network sees it after z-scoring); pooled over subjects that have pathology
    contrast = {m: {"scar": [], "edema": [], "blood": []} for m in SPEC.modalities}
    for i in range(3):
        case = synthesize_case(i, (96, 96, 6), seed=5)
        seg = case.seg
        assert set(np.unique(seg).tolist()) <= set(RAW_VALUES)
        assert (seg == 500).any() and (seg == 600).any() and (seg == 200).any()
        for m, img in case.images.items():
            myo, std = img[seg == 200].mean(), img.std()
            contrast[m]["blood"].append((img[seg == 500].mean() - myo) / std)
            if (seg == 2221).any():
                contrast[m]["scar"].append((img[seg == 2221].mean() - myo) / std)
                contrast[m]["edema"].append((img[seg == 1220].mean() - myo) / std)
    mean = {m: {k: float(np.mean(v)) for k, v in r.items()} for m, r in contrast.items()}
    assert mean["de"]["scar"] > 3 * max(mean["c0"]["scar"], mean["t2"]["scar"])  # scar: LGE
    assert mean["t2"]["edema"] > 2 * max(mean["c0"]["edema"], mean["de"]["edema"])  # edema: T2
    assert mean["c0"]["blood"] > 2 * max(mean["de"]["blood"], abs(mean["t2"]["blood"]))  # anatomy: bSSFP
    # deterministic by seed
    a, b = synthesize_case(1, (32, 32, 3), seed=2), synthesize_case(1, (32, 32, 3), seed=2)
    assert np.array_equal(a.images["de"], b.images["de"]) and np.array_equal(a.seg, b.seg)


def _write_subject(folder, name, shape, rng, modalities=("C0", "DE", "T2")):
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    seg = np.zeros(shape, np.int16)
    h, w = shape[:2]
    seg[h // 2 - 6:h // 2 + 6, w // 2 - 6:w // 2 + 6] = 200
    seg[h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4] = 500
    seg[h // 2 - 6:h // 2 - 4, w // 2 - 6:w // 2 - 2] = 2221
    seg[h // 2 + 4:h // 2 + 6, w // 2 - 6:w // 2 - 2] = 1220
    seg[6:9, 2:6] = 600  # inside the centre crop of the test below
    for suffix in modalities:
        write_nifti(folder / f"{name}_{suffix}.nii.gz", rng.random(shape).astype(np.float32) + 1, affine,
                    dtype=np.float32)
    write_label_map(folder / f"{name}_gd.nii.gz", seg, affine)
    return seg


def test_prepare_myops_layouts(tmp_path):
    from passion.data.cache import read_case, read_index
    from passion.data.preprocess import prepare_dataset, uncrop_pad

    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    flat = _write_subject(raw, "myops_training_101", (40, 36, 3), rng)
    (raw / "myops_training_102").mkdir()
    _write_subject(raw / "myops_training_102", "myops_training_102", (40, 36, 4), rng, modalities=("C0", "DE"))
    spec = DatasetSpec.from_dict({**SPEC.to_dict(), "crop_size": [32, 48]})  # crop one axis, pad the other
    summary = prepare_dataset(raw, tmp_path / "cache", spec, progress=False)
    assert summary["indexed"] == 2 and not summary["failed"]
    index = read_index(tmp_path / "cache")
    assert [c["name"] for c in index["cases"]] == ["myops_training_101", "myops_training_102"]
    assert index["cases"][1]["available"] == [True, True, False]
    case = read_case(tmp_path / "cache", "myops_training_101")
    assert case.image.shape == (3, 32, 48, 3) and case.label.shape == (32, 48, 3)
    assert case.meta["crop_box"] == [[4, 36], [-6, 42], [0, 3]] and case.meta["original_shape"] == [40, 36, 3]
    assert sorted(np.unique(case.label).tolist()) == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(uncrop_pad(case.label, case.meta["crop_box"], [40, 36, 3]),
                          np.vectorize(SPEC.label_map.get)(flat))
    assert (case.image[:, :, :6] == 0).all()  # padding
    other = read_case(tmp_path / "cache", "myops_training_102")
    assert other.image.shape == (3, 32, 48, 4) and (other.image[2] == 0).all()
    bad = tmp_path / "bad"
    bad.mkdir()
    seg = _write_subject(bad, "s1", (20, 20, 2), rng)
    seg[0, 0, 0] = 4
    write_label_map(bad / "s1_gd.nii.gz", seg, np.diag([1.5, 1.5, 8.0, 1.0]))
    with pytest.raises(PassionError, match="labels 4 are not in the myops2020 label map"):
        prepare_dataset(bad, tmp_path / "cache_bad", spec, progress=False)


def test_split_with_357_rates(tmp_path):
    from passion.data.splits import load_split, make_split, read_missing_csv

    names = [f"myops_training_{i}" for i in range(101, 141)]
    make_split(names, tmp_path / "split", val=0.0, test=0.0, seed=3, missing_rates=[0.3, 0.5, 0.7], spec=SPEC)
    rows = read_missing_csv(tmp_path / "split" / "train_missing.csv", SPEC)
    assert len(rows) == 40 and all(len(r.mask) == 3 and any(r.mask) for r in rows)
    missing = np.mean([[not v for v in r.mask] for r in rows], axis=0)
    assert missing[0] < missing[1] < missing[2]  # c0 < de < t2
    split = load_split(tmp_path / "split", spec=SPEC)
    assert len(split.masks) == 40


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from passion.config import load_config
    from passion.data.preprocess import prepare_dataset
    from passion.data.splits import make_split
    from passion.data.synthetic_myops import synthesize_dataset
    from passion.engine.trainer import train

    root = tmp_path_factory.mktemp("myops")
    synthesize_dataset(root / "raw", cases=4, shape=(64, 64, 6), seed=1, spec=SPEC, workers=1, progress_bar=False)
    spec = DatasetSpec.from_dict({**SPEC.to_dict(), "crop_size": [48, 48]})
    prepare_dataset(root / "raw", root / "cache", spec, progress=False)
    make_split(root / "cache", root / "split", val=0.0, test=0.25, seed=1, missing_rates=[0.3, 0.5, 0.7])
    from passion.demo import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [
        f"run_dir={root / 'run'}", f"data.cache={root / 'cache'}", f"data.split={root / 'split'}",
        "data.setting=idt_drop", "model.name=mmformer", "model.patch_size=[32,32]", "model.base_width=4",
        "objective.name=passion", "train.epochs=2", "train.iters_per_epoch=2", "train.batch_size=2",
        "train.threads=1", "train.precision=fp32"])
    train(cfg)
    return root


def test_tiny_end_to_end_2d(tiny_run):
    from passion.engine.evaluate import evaluate

    results = evaluate(tiny_run / "run", split="test", progress=False)
    assert results["dataset"] == "myops2020" and results["num_cases"] == 1
    assert len(results["subsets"]) == 7
    import csv

    with open(tiny_run / "run" / "eval" / "test" / "per_case.csv") as f:
        rows = {(r["subset"], r["region"]): float(r["dice"]) for r in csv.DictReader(f)}
    assert len(rows) == 7 * 3
    for s in results["subsets"]:  # one case: each subset's mean is that case's row
        assert s["dice"] == pytest.approx({reg: rows[(s["subset"], reg)] for reg in ("LV", "RV", "MYO")}, abs=1e-6)
    for reg in ("LV", "RV", "MYO"):
        assert results["mean"]["dice"][reg] == pytest.approx(np.mean([s["dice"][reg] for s in results["subsets"]]))
    assert "slice_wise" in results["conventions"] and results["conventions"]["roi_size"] == [32, 32]
    saved = json.loads((tiny_run / "run" / "eval" / "test" / "results.json").read_text())
    assert len(saved["subsets"]) == 7
    from passion.engine.overlay_cases import OVERLAY_FILE, load_overlay

    kept = load_overlay(tiny_run / "run" / "eval" / "test" / OVERLAY_FILE)  # a slice of the subject's stack
    names = kept.subset_names()  # full, singles, the two rarest in this tiny split's realised rates
    assert names[:4] == ["c0+de+t2", "c0", "de", "t2"] and len(names) == 5 and len(kept.cases) == 1


def test_tiny_predict_back_in_original_geometry(tiny_run, tmp_path):
    from passion.data.cache import read_case
    from passion.data.preprocess import uncrop_pad, unmap_labels
    from passion.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from passion.engine.inference import predict_classes
    from passion.engine.predict import predict

    name = (tiny_run / "split" / "test.txt").read_text().split()[0]
    files = {"c0": tiny_run / "raw" / f"{name}_C0.nii.gz", "t2": tiny_run / "raw" / f"{name}_T2.nii.gz"}
    out = predict(tiny_run / "run", files=files, output_dir=tmp_path / "pred", progress=False, log=None,
                  overlay=True)
    assert [p.name for p in out] == [f"{name}.nii.gz", f"{name}.png"]
    img = nib.load(str(out[0]))
    ref = nib.load(str(files["c0"]))
    assert img.shape == ref.shape == (64, 64, 6)
    assert np.allclose(img.affine, ref.affine)
    # what the model predicts from c0 and t2 on the cached (cropped, z-scored) case, put back on the
    # subject's grid in raw label values: predict must write exactly that
    net, cfg, _ = model_from_checkpoint(load_checkpoint(tiny_run / "run" / "checkpoints" / "last.pt"))
    case = read_case(tiny_run / "cache", name)
    available = [True, False, True]
    classes = predict_classes(net, case.image, [available], roi_size=[32, 32], available=available,
                              overlap=cfg.eval.overlap, sw_batch_size=cfg.eval.sw_batch_size or 1)[0]
    expected = unmap_labels(uncrop_pad(classes, case.meta["crop_box"], list(ref.shape)), SPEC)
    assert len(np.unique(expected)) >= 2  # not one class everywhere: an all-zero or misplaced output fails
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)


def test_demo_myops_and_synth_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from passion.demo import MYOPS_BUDGETS, Budget, run_demo

    passion_bin = Path(sys.executable).with_name("passion")
    res = subprocess.run([str(passion_bin), "synth", str(tmp_path / "s"), "--dataset", "myops2020", "--cases", "1",
                          "--shape", "32", "32", "2", "--workers", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "myops_synth_101_C0.nii.gz", "myops_synth_101_DE.nii.gz", "myops_synth_101_T2.nii.gz",
        "myops_synth_101_gd.nii.gz", "synth.json"]

    # 7 subjects: val 0.15 and test 0.25 leave 4 for training, enough for every modality under mr357.
    # A budget's own overrides apply to both runs; the caller's win over them.
    toy = Budget(cases=7, shape=(48, 48, 4), patch=32, epochs=1, iters_per_epoch=2, min_size=48,
                 overrides=("train.lr=5e-3", "train.threads=2"))
    report = run_demo(tmp_path / "demo", budget=toy, dataset="myops2020", log=lambda *_: None,
                      overrides=["model.base_width=4", "train.threads=1", "train.precision=fp32"])
    assert report.is_file()
    import yaml

    for objective in ("baseline", "passion"):
        saved = yaml.safe_load((tmp_path / "demo" / objective / "config.yaml").read_text())["train"]
        assert float(saved["lr"]) == 5e-3 and saved["threads"] == 1
    assert all("train.threads=1" in b.overrides for b in MYOPS_BUDGETS.values())  # see demo.py
    split = json.loads((tmp_path / "demo" / "split" / "split.json").read_text())
    assert json.dumps(split).count("0.7") >= 1  # the mr357 nominal rates are recorded
    results = json.loads((tmp_path / "demo" / "passion" / "eval" / "test" / "results.json").read_text())
    assert len(results["subsets"]) == 7 and results["regions"] == ["LV", "RV", "MYO"]
    with pytest.raises(PassionError, match="supports"):
        run_demo(tmp_path / "x", budget=toy, dataset="brats2023")
