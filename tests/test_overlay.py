"""Slice overlays: chosen cases and slices, figures that are not blank, the report and predict --overlay."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from passion.config import Config, save_config
from passion.data.cache import write_case, write_index
from passion.data.spec import get_spec
from passion.engine.checkpoint import save_checkpoint
from passion.engine.overlay_cases import (OVERLAY_FILE, OverlayCase, OverlayCollector, OverlayData,
                                          choose_slice, figure_subsets, load_overlay, pick_cases, rarest_pair)
from passion.models import register_model
from passion.report.overlay import draw_cases, draw_orthogonal
from passion.utils import PassionError

SPEC = get_spec("brats2020")
MYOPS = get_spec("myops2020")
SHAPE = (18, 16, 12)
MR2468 = {"flair": 0.6, "t1ce": 0.4, "t1": 0.2, "t2": 0.8}


pytestmark = pytest.mark.usefixtures("one_thread")


@register_model("_tiny_overlay_test")
class TinyOverlayNet(FakeBackbone):
    def __init__(self, num_modalities=4, num_classes=4, base_width=4, patch_size=(8, 8, 8), spatial_dims=3):
        super().__init__(num_modalities, num_classes, base_width, spatial_dims)


def _pixels(path):
    assert path.is_file() and path.stat().st_size < 2_000_000
    return mpimg.imread(str(path))[..., :3]


def _blob(shape, lo, hi):
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return out


def test_choose_slice_is_the_one_with_the_most_reference_tumour():
    label = np.zeros((10, 10, 9), np.uint8)
    label[4:6, 4:6, 2] = 2      # 4 voxels
    label[1:9, 1:9, 6] = 1      # 64 voxels: the most, though not the centre of mass of all
    label[2:8, 2:8, 7] = 3      # 36 voxels
    assert choose_slice(label) == 6
    pred = np.zeros_like(label)
    pred[3:5, 3:5, 1] = 1
    assert choose_slice(label, pred) == 6
    assert choose_slice(np.zeros_like(label), pred) == 1  # empty reference: the predicted tumour
    assert choose_slice(np.zeros_like(label), np.zeros_like(label)) == 4  # both empty: the middle


def test_pick_cases_and_figure_subsets():
    assert pick_cases({"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.7}) == [("worst", "b"), ("median", "a"), ("best", "c")]
    assert pick_cases({"a": 0.5}) == [("worst", "a")]
    assert pick_cases({"a": float("nan"), "b": 0.2}) == [("worst", "a"), ("best", "b")]
    assert rarest_pair(SPEC, MR2468) == ("flair", "t2")
    rows = figure_subsets(SPEC, SPEC.subsets(), rarest_pair(SPEC, MR2468))
    assert [SPEC.subset_name(SPEC.subsets()[k]) for k in rows] == ["flair+t1ce+t1+t2", "flair", "t1ce", "t1", "t2",
                                                                    "flair+t2"]
    assert len(figure_subsets(SPEC, SPEC.subsets(), None)) == 5  # no training split known: no pair row


def _overlay_data(spec, preds, label, n_cases=3, available=None):
    rng = np.random.default_rng(0)
    subsets = [tuple([True] * spec.num_modalities)] + [tuple(i == k for i in range(spec.num_modalities))
                                                       for k in range(spec.num_modalities)]
    data = OverlayData(spec, list(spec.regions), next(iter(spec.regions)), subsets)
    for k, role in enumerate(("worst", "median", "best")[:n_cases]):
        image = rng.normal(size=(spec.num_modalities, *label.shape)).astype(np.float32) + 3 * (label > 0)
        data.cases.append(OverlayCase(
            name=f"case{k}", role=role, score=0.1 * k, slice=5, image=image, label=label,
            preds=np.stack([preds] * len(subsets)), dice=[{r: 0.5 for r in spec.regions}] * len(subsets),
            available=available or [True] * spec.num_modalities, spacing=[1.0, 1.2, 1.5]))
    return data


def test_case_figures_are_not_blank_and_differ_with_the_prediction(tmp_path):
    label = _blob((24, 20), (6, 5), (16, 14)) * 2
    label[9:13, 8:11] = 3
    a = draw_cases(_overlay_data(SPEC, label, label), tmp_path / "a.png", title="run a")
    b = draw_cases(_overlay_data(SPEC, np.zeros_like(label) + 2 * (np.arange(24)[:, None] > 3), label),
                   tmp_path / "b.png", title="run a")
    pa, pb = _pixels(a), _pixels(b)
    assert pa.var() > 1e-3 and pb.var() > 1e-3
    assert pa.shape == pb.shape and np.abs(pa - pb).max() > 0.1


def test_empty_reference_and_empty_prediction_still_give_figures(tmp_path):
    empty = np.zeros((20, 20), np.uint8)
    path = draw_cases(_overlay_data(SPEC, empty, empty, n_cases=1), tmp_path / "empty.png")
    assert _pixels(path).var() > 1e-3
    path = draw_orthogonal(np.random.default_rng(1).normal(size=(4, 12, 10, 8)), [True, False, False, True],
                           np.zeros((12, 10, 8), np.uint8), SPEC, tmp_path / "ortho.png")
    assert _pixels(path).var() > 1e-3
    collector = OverlayCollector(SPEC, SPEC.subsets(), ("flair", "t2"))
    vol = np.zeros(SHAPE, np.uint8)
    collector.add("c", np.ones((4, *SHAPE), np.float32), vol, np.zeros((15, *SHAPE), np.uint8), [], [True] * 4)
    assert collector.cases["c"].slice == SHAPE[-1] // 2


def test_2d_dataset_figures_from_the_slice_stack(tmp_path):
    """MyoPS: the report slice is picked from a subject's stack; predict's views use its spacing."""
    stack = np.zeros((32, 28, 5), np.uint8)
    stack[8:20, 8:20, 1] = 2
    stack[10:14, 10:14, 3] = 3
    stack[12:14, 12:14, 3] = 1
    classes = np.stack([stack] * 7)
    collector = OverlayCollector(MYOPS, MYOPS.subsets(), rarest_pair(MYOPS, {"c0": 0.3, "de": 0.5, "t2": 0.7}))
    assert [MYOPS.subset_name(collector.evaluated[k]) for k in collector.rows] == ["c0+de+t2", "c0", "de", "t2",
                                                                                   "de+t2"]
    image = np.random.default_rng(0).normal(size=(3, *stack.shape)).astype(np.float32)
    collector.add("s1", image, stack, classes, [], [True] * 3, [1.25, 1.25, 10.0])
    data = collector.chosen()
    assert data.cases[0].slice == 1 and data.cases[0].preds.shape == (5, 32, 28)
    assert _pixels(draw_cases(data, tmp_path / "myops.png")).var() > 1e-3
    assert _pixels(draw_orthogonal(image, [True, False, True], stack, MYOPS, tmp_path / "o.png",
                                   [1.25, 1.25, 10.0])).var() > 1e-3


def make_run(root, seed=0, objective="baseline", names=("c1", "c2", "c3")):
    """A tiny cache, split (with training missing rates) and a fake-backbone checkpoint."""
    rng = np.random.default_rng(1)
    cache, split, run = root / "cache", root / "split", root / f"run{seed}"
    if not (cache / "dataset.json").is_file():
        entries = []
        for k, name in enumerate(names):
            label = np.zeros(SHAPE, np.uint8)
            label[4:12 + k, 4:11, 3:8] = 2
            label[6:9, 6:9, 4:7] = 3
            label[2:14, 2:14, 5] = np.maximum(label[2:14, 2:14, 5], 2)  # the slice with the most tumour
            image = rng.normal(size=(4, *SHAPE)).astype(np.float32)
            image[:, label > 0] += 2.0
            meta = {"name": name, "available": [True] * 4, "original_shape": list(SHAPE), "spacing": [1.0] * 3,
                    "affine": np.eye(4).tolist(), "crop_box": [[0, s] for s in SHAPE], "files": {}}
            write_case(cache, name, image, label, meta)
            entries.append({"name": name, "available": [True] * 4, "shape": list(SHAPE)})
        write_index(cache, SPEC, entries, {"min_size": 8})
        split.mkdir(parents=True)
        (split / "test.txt").write_text("".join(f"{n}\n" for n in names))
        train = {"cases": 5, "complete_cases": 1, "missing_rate": MR2468, "subset_counts": {},
                 "present": {m: round(5 * (1 - r)) for m, r in MR2468.items()}}
        (split / "split.json").write_text(json.dumps({"train_missing": train}))
    cfg = Config(run_dir=str(run))
    cfg.data.cache, cfg.data.split = str(cache), str(split)
    cfg.model.name, cfg.model.patch_size, cfg.model.base_width = "_tiny_overlay_test", [8, 8, 8], 4
    cfg.train.device, cfg.train.epochs, cfg.train.threads = "cpu", 1, 1
    cfg.objective.name = objective
    torch.manual_seed(seed)
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "spec": SPEC.to_dict(),
        "model": TinyOverlayNet().state_dict(), "epoch": 1, "iteration": 10})
    save_config(cfg, run / "config.yaml")
    return run


def test_evaluate_keeps_three_cases_and_the_report_draws_every_run(tmp_path):
    from passion.engine.evaluate import evaluate
    from passion.report.compare import write_comparison_report

    runs = [make_run(tmp_path, seed, objective) for seed, objective in ((0, "baseline"), (1, "passion"))]
    for run in runs:
        evaluate(run, split="test", progress=False)
    kept = load_overlay(runs[0] / "eval" / "test" / OVERLAY_FILE)
    assert [c.role for c in kept.cases] == ["worst", "median", "best"]
    assert kept.subset_names() == ["flair+t1ce+t1+t2", "flair", "t1ce", "t1", "t2", "flair+t2"]
    assert all(c.slice == 5 and c.preds.shape == (6, *SHAPE[:2]) for c in kept.cases)  # the largest tumour slice
    assert sorted(c.score for c in kept.cases) == [c.score for c in kept.cases]

    report = write_comparison_report(runs, tmp_path / "report")
    text = report.read_text()
    figures = sorted((tmp_path / "report").glob("overlay_*.png"))
    assert [p.name for p in figures] == ["overlay__tiny_overlay_test+baseline.png",
                                         "overlay__tiny_overlay_test+passion.png"]
    assert "## Overlays" in text and text.count("![overlay ") == 2
    a, b = (_pixels(p) for p in figures)
    assert a.var() > 1e-3 and a.shape == b.shape and np.abs(a - b).max() > 0.1

    # an evaluation made before overlays existed: the report predicts the chosen cases once and keeps them
    (runs[1] / "eval" / "test" / OVERLAY_FILE).unlink()
    write_comparison_report(runs, tmp_path / "report2")
    assert (runs[1] / "eval" / "test" / OVERLAY_FILE).is_file()
    assert np.array_equal(_pixels(tmp_path / "report2" / figures[1].name), b)


def _nifti_case(root, name, modalities):
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    head = _blob((20, 18, 14), (2, 2, 2), (18, 16, 12)).astype(bool)
    for m in modalities:
        nib.save(nib.Nifti1Image(np.where(head, rng.normal(100, 20, head.shape), 0).astype(np.float32),
                                 np.diag([1.0, 1.0, 2.0, 1.0])), str(d / f"{name}_{m}.nii.gz"))
    return d


def test_predict_overlay_writes_one_png_per_case(tmp_path):
    from typer.testing import CliRunner

    from passion.cli import _register, app
    from passion.engine.predict import predict

    _register()
    run = make_run(tmp_path)
    raw = tmp_path / "raw"
    _nifti_case(raw, "p1", ("flair", "t2"))
    _nifti_case(raw, "p2", ("t1ce",))
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["predict", "--checkpoint", str(run), "--output", str(out), str(raw),
                                 "--overlay", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["p1.nii.gz", "p1.png", "p2.nii.gz", "p2.png"]
    assert _pixels(out / "p1.png").var() > 1e-3
    for p in out.glob("*.nii.gz"):
        p.unlink()
    with pytest.raises(PassionError, match=r"p1.png already exists"):  # nothing is overwritten unasked
        predict(run, [raw], out, overlay=True, progress=False, log=None)
