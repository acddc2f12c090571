"""Sliding-window inference with feature reuse, and `evaluate` on a tiny model and cache."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passion.config import Config
from passion.data.cache import write_case, write_index
from passion.data.spec import get_spec
from passion.engine.checkpoint import save_checkpoint
from passion.engine.inference import NaivePredictor, SubsetPredictor, predict_subsets
from passion.models import list_models, register_model
from passion.models.interface import Backbone, Features, FusedOutput
from passion.utils import PassionError

SPEC = get_spec("brats2020")
ROI = [16, 16, 16]


pytestmark = pytest.mark.usefixtures("one_thread")


@register_model("_tiny_eval_test")
class TinyNet(Backbone):
    """Two-scale per-modality encoder, mean fusion over the available modalities."""

    def __init__(self, num_modalities=4, num_classes=4, base_width=4, patch_size=(16, 16, 16), spatial_dims=3):
        super().__init__()
        self.num_modalities, self.num_classes = num_modalities, num_classes
        w = base_width
        self.enc1 = nn.ModuleList(nn.Conv3d(1, w, 3, padding=1) for _ in range(num_modalities))
        self.enc2 = nn.ModuleList(nn.Conv3d(w, w, 3, stride=2, padding=1) for _ in range(num_modalities))
        self.head = nn.Conv3d(2 * w, num_classes, 1)
        self.bias = nn.Parameter(torch.randn(num_modalities, num_classes) * 0.5)

    def encode(self, x, mask):
        x = self.zero_unavailable(x, mask)
        f1 = torch.stack([F.leaky_relu(e(x[:, m:m + 1]), 0.2) for m, e in enumerate(self.enc1)], 1)
        f2 = torch.stack([F.leaky_relu(e(f1[:, m]), 0.2) for m, e in enumerate(self.enc2)], 1)
        return Features([self.zero_unavailable(f1, mask), self.zero_unavailable(f2, mask)])

    def fuse(self, features, mask):
        mask = mask.to(features.scales[0].device)
        n = mask.sum(1).clamp(min=1).float().reshape(-1, 1, 1, 1, 1)
        g1 = self.zero_unavailable(features.scales[0], mask).sum(1) / n
        g2 = self.zero_unavailable(features.scales[1], mask).sum(1) / n
        g2 = F.interpolate(g2, size=g1.shape[2:], mode="trilinear", align_corners=False)
        logits = self.head(torch.cat([g1, g2], 1))
        logits = logits + (mask.float() @ self.bias).reshape(*logits.shape[:2], 1, 1, 1)
        return FusedOutput(logits, [], [g1])

    def decode_single(self, features, mask=None):
        outs = [self.fuse(Features([s[:, m:m + 1] for s in features.scales]),
                          torch.ones(features.batch_size, 1, dtype=torch.bool)).logits
                for m in range(self.num_modalities)]
        return torch.stack(outs, 1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyNet().eval()


def make_cache(root, names=("c1", "c2"), shape=(20, 18, 22), seed=0):
    rng = np.random.default_rng(seed)
    cache = root / "cache"
    entries = []
    for name in names:
        image = rng.normal(size=(4, *shape)).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[4:14, 4:14, 5:16] = 2
        label[6:11, 6:11, 7:12] = 1
        label[8:10, 8:10, 8:10] = 3
        image[:, label > 0] += 2.0
        meta = {"name": name, "available": [True] * 4, "original_shape": [s + 4 for s in shape],
                "affine": np.diag([1.0, 1.0, 1.5, 1.0]).tolist(), "spacing": [1.0, 1.0, 1.5],
                "crop_box": [[2, s + 2] for s in shape], "files": {}}
        write_case(cache, name, image, label, meta)
        entries.append({"name": name, "available": [True] * 4, "shape": list(shape)})
    write_index(cache, SPEC, entries, {"min_size": 16})
    return cache


def make_run(root, cache=None, names=("c1", "c2")):
    cache = cache or make_cache(root, names)
    split = root / "split"
    split.mkdir(parents=True, exist_ok=True)
    (split / "test.txt").write_text("".join(f"{n}\n" for n in names))
    run = root / "run"
    cfg = Config(run_dir=str(run))
    cfg.data.cache, cfg.data.split = str(cache), str(split)
    cfg.model.name, cfg.model.patch_size, cfg.model.base_width = "_tiny_eval_test", list(ROI), 4
    cfg.train.device, cfg.train.epochs = "cpu", 1
    model = tiny_model()
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "spec": SPEC.to_dict(),
        "model": model.state_dict(), "epoch": 1, "iteration": 10})
    return run


def _check_reuse_equals_forward(model, x, atol=1e-5):
    subsets = SPEC.subsets()
    reuse = SubsetPredictor(model, subsets)(x)
    torch.testing.assert_close(SubsetPredictor(model, subsets, fuse_batch=4)(x), reuse, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        ref = torch.cat([torch.softmax(model(x, torch.tensor(s).expand(x.shape[0], -1)), 1) for s in subsets], 1)
    assert reuse.shape == ref.shape == (x.shape[0], 15 * 4, *x.shape[2:])
    torch.testing.assert_close(reuse, ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(NaivePredictor(model, subsets)(x), ref, atol=atol, rtol=1e-4)


def test_feature_reuse_equals_per_subset_forward():
    torch.manual_seed(1)
    _check_reuse_equals_forward(tiny_model(), torch.randn(2, 4, *ROI))


_BUILTIN_SIZES = {"rfnet": 16, "mmformer": 32, "m2ftrans": 32}


@pytest.mark.parametrize("name", sorted(_BUILTIN_SIZES))
def test_feature_reuse_equals_forward_builtin_backbones(name):
    """Reuse is only valid if encode is per-modality; check it for every registered backbone."""
    from passion.models import build_model

    size = _BUILTIN_SIZES[name]
    torch.manual_seed(2)
    model = build_model(name, num_modalities=4, num_classes=4, base_width=4, patch_size=(size,) * 3).eval()
    x = torch.randn(1, 4, size, size, size)
    subsets = SPEC.subsets() if size <= 16 else [SPEC.subsets()[i] for i in (0, 3, 9, 14)]
    reuse = SubsetPredictor(model, subsets, fuse_batch=2)(x)
    with torch.no_grad():
        ref = torch.cat([torch.softmax(model(x, torch.tensor(s)[None]), 1) for s in subsets], 1)
    torch.testing.assert_close(reuse, ref, atol=1e-4, rtol=1e-3)


def test_predict_subsets_sliding_window_and_chunks():
    torch.manual_seed(3)
    model = tiny_model()
    image = np.random.default_rng(0).normal(size=(4, 21, 19, 24)).astype(np.float32)
    subsets = SPEC.subsets()
    kw = dict(roi_size=ROI, overlap=0.5, device="cpu")
    reuse = predict_subsets(model, image, subsets, **kw)
    naive = predict_subsets(model, image, subsets, reuse_features=False, **kw)
    chunked = predict_subsets(model, image, subsets, subset_chunk=4, **kw)
    batched = predict_subsets(model, image, subsets, fuse_batch=None, **kw)
    torch.testing.assert_close(reuse, batched, atol=1e-5, rtol=1e-4)
    assert reuse.shape == (15, 4, 21, 19, 24)
    torch.testing.assert_close(reuse, naive, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reuse, chunked, atol=1e-6, rtol=0)
    torch.testing.assert_close(reuse.sum(1), torch.ones(15, 21, 19, 24), atol=1e-5, rtol=0)
    # a single subset equals the full run's entry; unavailable modalities are ignored by the input
    one = predict_subsets(model, image, [subsets[3]], available=subsets[3], **kw)
    torch.testing.assert_close(one[0], reuse[3], atol=1e-5, rtol=1e-4)
    small = image[:, :16, :16, :16]  # bf16 convolutions are slow on CPUs without bf16 units
    bf16 = predict_subsets(model, small, subsets[-1:], precision="bf16", **kw)
    fp32 = predict_subsets(model, small, subsets[-1:], **kw)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.1
    with pytest.raises(PassionError):
        predict_subsets(model, image, [subsets[-1]], available=subsets[0], **kw)
    with pytest.raises(PassionError):
        predict_subsets(model, image, subsets[:1], precision="fp16", **kw)


def test_evaluate_writes_all_outputs(tmp_path):
    import passion

    run = make_run(tmp_path)
    res = passion.evaluate(run, split="test", progress=False)
    out = run / "eval" / "test"
    for f in ("per_case.csv", "results.json", "results.md", "heatmap.png", "overlay_cases.npz"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert len(res["subsets"]) == 15 and res["cases"] == ["c1", "c2"]
    for entry in res["subsets"] + [res["mean"]]:
        for key in ("dice", "hd95"):
            assert set(entry[key]) == {"WT", "TC", "ET", "ETpost"}
    assert res["subsets"][0]["modalities"] == ["t2"] and res["subsets"][-1]["modalities"] == list(SPEC.modalities)
    assert res["conventions"]["one_empty"]["hd95"] == 373.13 and res["conventions"]["overlap"] == 0.5
    post = res["conventions"]["postprocess"]
    assert post["min_volume_mm3"] == 500 and "mm^3" in post["rule"] and "voxel volume" in post["rule"]
    assert res["config_hash"] and res["checkpoint"].endswith("last.pt")
    wt = [s["dice"]["WT"] for s in res["subsets"]]
    assert res["mean"]["dice"]["WT"] == pytest.approx(np.mean(wt))
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 15 * 4
    for entry in res["subsets"]:  # each subset's value is the mean of its two cases' rows
        for key in ("dice", "hd95"):
            for region, value in entry[key].items():
                cases = [float(r[key]) for r in rows if r["subset"] == entry["subset"] and r["region"] == region]
                assert len(cases) == 2 and value == pytest.approx(np.mean(cases), abs=1e-4), (entry["subset"], key)
    assert len({round(s["dice"]["WT"], 6) for s in res["subsets"]}) > 1  # the subsets really differ
    md = (out / "results.md").read_text()
    assert md.count("●") + md.count("○") == 15 * 4 + 2 and "**mean**" in md and "373.13" in md
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(PassionError, match="exists"):
        passion.evaluate(run, progress=False)
    sub = passion.evaluate(run, subsets="flair+t1ce,t2", progress=False, overwrite=True)
    assert [s["subset"] for s in sub["subsets"]] == ["t2", "flair+t1ce"]


def test_evaluate_bad_inputs(tmp_path):
    from passion.engine.evaluate import evaluate

    run = make_run(tmp_path)
    with pytest.raises(PassionError, match="split"):
        evaluate(run, split="val", progress=False)
    with pytest.raises(PassionError, match="not in cache"):
        evaluate(run, cases=["c1", "nope"], progress=False)
    with pytest.raises(PassionError, match="unknown modality"):
        evaluate(run, subsets="flair+pd", progress=False)
    with pytest.raises(PassionError, match="no checkpoint"):
        evaluate(run, checkpoint="best", progress=False)
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(PassionError, match="not a passion checkpoint"):
        evaluate(run, checkpoint=str(bogus), progress=False)


def test_cli_evaluate(tmp_path):
    from typer.testing import CliRunner

    from passion.cli import _register, app

    _register()
    run = make_run(tmp_path)
    r = CliRunner().invoke(app, ["evaluate", str(run), "--subsets", "t1,flair+t1ce+t1+t2", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval" / "test" / "results.json").read_text())
    assert [s["subset"] for s in res["subsets"]] == ["t1", "flair+t1ce+t1+t2"]
    assert "mean" in r.output
