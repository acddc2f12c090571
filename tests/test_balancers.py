"""Competing balancing objectives (OGM-GE, PMR, DWA, uncertainty) and `passion compare`."""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fakes import FakeBackbone, random_batch
from passion.config import ConfigError, ObjectiveConfig
from passion.method import build_objective, list_objectives
from passion.method.objectives.loss_balancers import DWAObjective
from passion.method.objectives.ogm_ge import ogm_coefficients
from passion.method.objectives.pmr import pmr_weights
from passion.method.objectives.terms import ratio_to_others

NAMES = ["flair", "t1ce", "t2"]
COUNTS = [5, 3, 4]
ITERS = 10
BALANCERS = ["ogm_ge", "pmr", "dwa", "uncertainty"]
PASSION_BIN = Path(sys.executable).with_name("passion")


class Fake(FakeBackbone):
    """The fake backbone plus the per-modality parameter contract; `hint` (one-hot target) makes
    modality 0's single-modality prediction confidently right: a clearly dominant modality."""

    hint: torch.Tensor | None = None

    def modality_parameters(self, m: int):
        return list(self.encoders[m].parameters())

    def decode_single(self, features, mask=None):
        logits = super().decode_single(features, mask)
        if self.hint is not None:
            bonus = torch.zeros_like(logits)
            bonus[:, 0] = 20.0 * self.hint
            logits = logits + bonus
        return logits


def make(name: str, setting: str = "idt", all_reduce=None, **options):
    return build_objective(name, ObjectiveConfig(name=name, options=options), 3, NAMES, COUNTS, ITERS, setting,
                           all_reduce=all_reduce)


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


def _step(obj, model, batch, epoch=1, opt=None):
    out = obj(model, batch, epoch)
    if opt is not None:
        opt.zero_grad()
    out.loss.backward()
    hook = getattr(obj, "after_backward", None)
    extra = hook(model, epoch) if hook is not None else None
    if opt is not None:
        opt.step()
    return out, extra


def test_registry_lists_all_objectives():
    assert {"baseline", "passion", "ogm_ge", "pmr", "dwa", "uncertainty"} <= set(list_objectives())


@pytest.mark.parametrize("name", BALANCERS)
def test_overfitting_one_volume_drives_loss_down(name):
    model = Fake(width=4)
    obj = make(name)
    batch = random_batch(batch=1, size=8, mask=[[True, True, False]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    totals = []
    for i in range(30):
        out, _ = _step(obj, model, batch, epoch=i // 10, opt=opt)
        totals.append(out.loss.item())
        if i % 10 == 9:
            obj.end_epoch(i // 10)
    assert all(torch.isfinite(torch.tensor(totals)))
    assert sum(totals[-5:]) < 0.6 * sum(totals[:5]), totals


@pytest.mark.parametrize("name", BALANCERS)
def test_state_round_trip_is_weights_only_safe(name):
    model = Fake(width=4)
    obj = make(name)
    batch = random_batch(batch=2, size=8, mask=[[True, True, False], [True, False, True]])
    for epoch in range(3):
        _step(obj, model, batch, epoch=epoch)
        obj.end_epoch(epoch)
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    fresh = make(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    probe = Fake(width=4)
    a, _ = _step(obj, copy.deepcopy(probe), batch, epoch=3)
    b, _ = _step(fresh, copy.deepcopy(probe), batch, epoch=3)
    for key in ("loss_weight", "ogm_coeff", "pmr_weight"):
        if key in a.stats:
            assert a.stats[key] == pytest.approx(b.stats[key]), key


class TwoRanks:
    """all_reduce for two objectives run in two threads: a real sum across the pair, as gloo would."""

    def __init__(self):
        self.barrier, self.box = threading.Barrier(2, timeout=60), [None, None]

    def reduce_for(self, rank: int):
        def reduce(t):
            self.box[rank] = t.detach().clone()
            self.barrier.wait()
            out = self.box[0] + self.box[1]
            self.barrier.wait()  # both have read before the next call overwrites the box
            return out
        return reduce


def _decisions(obj, model, batches: list[dict]) -> list[dict]:
    """Per epoch (one batch each): the modulation a balancer decides (its per-modality stats)."""
    keys = ("loss_weight", "ogm_coeff", "pmr_weight", "confidence", "ratio", "epoch_sep")
    out = []
    for epoch, batch in enumerate(batches):
        res, _ = _step(obj, copy.deepcopy(model), batch, epoch=epoch)
        stats = {**res.stats, **(obj.end_epoch(epoch) or {})}
        out.append({k: v for k, v in stats.items() if k in keys})
    return out


@pytest.mark.parametrize("name", BALANCERS)
def test_two_ranks_decide_the_modulation_of_their_joint_batch(name):
    """Statistics that steer the modulation are sums and counts over the global batch: two ranks
    holding two halves decide exactly what one process decides on the whole batch."""
    model = Fake(width=4)
    mask = [[True, True, False], [True, False, True], [False, True, True], [True, True, True]]
    wholes = [random_batch(batch=4, size=8, mask=mask, seed=3 + epoch) for epoch in range(3)]
    halves = [[{k: v[r * 2:(r + 1) * 2] for k, v in w.items()} for w in wholes] for r in range(2)]
    expected = _decisions(make(name), model, wholes)

    pair, results = TwoRanks(), [None, None]

    def rank(r):
        results[r] = _decisions(make(name, all_reduce=pair.reduce_for(r)), model, halves[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    weights = [v for e in expected for k, w in e.items() if k in ("loss_weight", "ogm_coeff", "pmr_weight")
               for v in w.values()]
    assert weights and any(abs(v - weights[0]) > 1e-3 for v in weights), f"{name} never modulated: {expected}"
    for got in results:
        assert got is not None
        for e, g in zip(expected, got):
            assert set(e) == set(g)
            for key in e:
                assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (name, key)


def test_bad_options_fail_with_one_line():
    with pytest.raises(ConfigError, match="objective.options.alpha"):
        make("ogm_ge", alpha=-1)
    with pytest.raises(ConfigError, match="no option"):
        make("pmr", alhpa=1.0)
    with pytest.raises(ConfigError, match="weighting"):
        make("pmr", weighting="sometimes")
    with pytest.raises(ConfigError, match="temperature"):
        make("dwa", temperature=0)
    with pytest.raises(ConfigError, match="max_weight"):
        make("uncertainty", min_weight=2.0, max_weight=1.0)


# ---------------------------------------------------------------- OGM-GE

def test_ogm_formulas():
    ratio = ratio_to_others(torch.tensor([0.9, 0.3, 0.3, 0.0]), torch.tensor([True, True, True, False]))
    torch.testing.assert_close(ratio, torch.tensor([3.0, 0.5, 0.5, 1.0], dtype=torch.float64))
    k = ogm_coefficients(ratio, 0.1)
    assert k[0].item() == pytest.approx(1 - torch.tanh(torch.tensor(0.3)).item())
    assert k[1:].tolist() == [1.0, 1.0, 1.0]
    # a modality alone in the batch has nobody to dominate
    assert ratio_to_others(torch.tensor([0.9, 0.0]), torch.tensor([True, False])).tolist() == [1.0, 1.0]


def _dominant_setup(batch_size=2):
    model = Fake(width=4)
    batch = random_batch(batch=batch_size, size=8)
    model.hint = torch.nn.functional.one_hot(batch["target"], 3).movedim(-1, 1).float()
    return model, batch


def test_ogm_slows_down_the_dominant_encoder_only():
    model, batch = _dominant_setup()
    obj = make("ogm_ge", ge=False, alpha=0.5)
    out = obj(model, batch, 1)
    out.loss.backward()
    before = {m: [p.grad.clone() for p in model.modality_parameters(m)] for m in range(3)}
    coeff = out.stats["ogm_coeff"]
    assert coeff["flair"] < 1 and coeff["t1ce"] == 1.0 and coeff["t2"] == 1.0, coeff
    assert out.stats["confidence"]["flair"] > out.stats["confidence"]["t1ce"]
    obj.after_backward(model, 1)
    for m in range(3):
        k = 1.0 if m else coeff["flair"]
        for p, g in zip(model.modality_parameters(m), before[m]):
            want = g * k if g.dim() >= 2 else g  # biases are not modulated (as in the reference)
            torch.testing.assert_close(p.grad, want)


def test_ogm_ge_noise_is_reproducible_and_scaled_by_grad_std():
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        model, batch = _dominant_setup()
        obj = make("ogm_ge", alpha=0.5, noise_seed=3)
        out = obj(model, batch, 1)
        out.loss.backward()
        clean = [p.grad.clone() for p in model.modality_parameters(1)]
        out.add_stats(obj.after_backward(model, 1))  # as the trainer does: read with the step's stats
        grads.append([p.grad.clone() for p in model.modality_parameters(1)])
        assert out.stats["ge_noise_std"]["t1ce"] > 0
    for a, b, c in zip(grads[0], grads[1], clean):
        torch.testing.assert_close(a, b)  # same seed and step: same noise (identical on every DDP rank)
    assert any(not torch.equal(a, c) for a, c in zip(grads[0], clean))


def test_ogm_outside_the_modulation_window_leaves_gradients_alone():
    model, batch = _dominant_setup()
    obj = make("ogm_ge", modulation_starts=0, modulation_ends=2)
    out = obj(model, batch, 2)
    out.loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p.grad.clone() for p in params]
    assert obj.after_backward(model, 2) is None
    assert out.stats["ogm_coeff"] == {n: 1.0 for n in NAMES}
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------- PMR

def test_pmr_weight_formula():
    w = pmr_weights(torch.tensor([2.0, 0.8, 0.25, 1.0]), 1.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.25, 1.0, 0.0]))
    assert pmr_weights(torch.tensor([2.0, 0.8]), 0.5, "constant").tolist() == [0.0, 0.5]


def test_pmr_pushes_the_weaker_modalities_only():
    # modality 0 sees the label map itself, the others only noise: its prototypes separate the classes
    torch.manual_seed(1)
    batch = random_batch(batch=2, size=8)
    image = torch.randn_like(batch["image"])
    image[:, 0] = 2.0 * batch["target"].float() - 2.0
    batch["image"] = image
    model = Fake(width=4)
    obj = make("pmr")
    for _ in range(3):  # a few steps: the prototypes were initialised from the first batch
        out = obj(model, batch, 0)
    s = out.stats
    assert s["proto_score"]["flair"] > s["proto_score"]["t1ce"] and s["proto_score"]["flair"] > s["proto_score"]["t2"]
    assert s["pmr_weight"]["flair"] == 0.0
    assert s["pmr_weight"]["t1ce"] > 0 and s["pmr_weight"]["t2"] > 0
    assert s["pce_total"] > 0


def test_pmr_missing_modality_gets_no_prototype_update_and_no_weight():
    model = Fake(width=4)
    obj = make("pmr")
    out = obj(model, random_batch(batch=2, size=8, mask=[[True, True, False], [True, True, False]]), 0)
    assert not obj.seen[2].any()
    assert out.stats["pmr_weight"]["t2"] == 0.0 and out.stats["pce"]["t2"] == 0.0


# ---------------------------------------------------------------- DWA / uncertainty

def _terms(sep: list[list[float]], a: list[list[float]] | None = None):
    sep_bm = torch.tensor(sep)
    return SimpleNamespace(sep_bm=sep_bm, a=torch.ones_like(sep_bm) if a is None else torch.tensor(a))


def test_dwa_weights_the_slower_decreasing_loss_more():
    w = DWAObjective.weights_from_history([[1.0, 1.0, 1.0], [0.5, 0.9, 1.0]], 2.0)
    assert w[0] < w[1] < w[2] and w.sum().item() == pytest.approx(3.0)
    obj = make("dwa")
    for epoch, losses in enumerate([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.4, 0.95, 0.7]]):
        assert obj.sep_weights(_terms([losses]), epoch).tolist() == pytest.approx(
            [1.0, 1.0, 1.0] if epoch < 2 else obj.lam.tolist())
        obj.end_epoch(epoch)
    lam = obj.lam
    assert lam[1] > lam[2] > lam[0], lam  # t1ce barely decreased, flair decreased most


def test_dwa_epoch_means_count_only_samples_having_the_modality():
    obj = make("dwa")
    obj.sep_weights(_terms([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]), 0)
    out = obj.end_epoch(0)
    assert out["epoch_sep"] == {"flair": 1.0, "t1ce": 2.0, "t2": 0.0}
    obj.sep_weights(_terms([[0.5, 2.0, 0.0]], [[1, 1, 0]]), 1)
    lam = obj.end_epoch(1)["loss_weight"]
    assert lam["t2"] == 1.0 and lam["t1ce"] > lam["flair"]  # unseen t2 keeps 1
    assert lam["flair"] + lam["t1ce"] == pytest.approx(2.0)


def test_uncertainty_gives_the_noisier_loss_less_weight():
    obj = make("uncertainty", momentum=0.5)
    assert obj.sep_weights(_terms([[2.0, 0.5, 1.0]]), 0).tolist() == [1.0, 1.0, 1.0]  # nothing seen yet
    for _ in range(5):
        lam = obj.sep_weights(_terms([[2.0, 0.5, 1.0]]), 0)
    torch.testing.assert_close(lam, torch.tensor([0.5, 2.0, 1.0]))  # exp(-s*) = 1 / L
    obj = make("uncertainty", max_weight=1.5)
    for _ in range(2):
        lam = obj.sep_weights(_terms([[2.0, 0.5, 1.0]]), 0)
    assert lam[1].item() == pytest.approx(1.5)


# ---------------------------------------------------------------- passion compare (toy budget)

TOY_SETS = ["model.base_width=4", "model.patch_size=16", "train.threads=1", "train.precision=fp32",
            "train.epochs=1", "train.iters_per_epoch=2", "data.augment=false", "eval.overlap=0",
            "eval.sw_batch_size=8"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from passion.data.preprocess import prepare_dataset
    from passion.data.spec import get_spec
    from passion.data.splits import make_split
    from passion.data.synthetic import synthesize_dataset
    from passion.demo import MR2468

    root = tmp_path_factory.mktemp("cmp")
    spec = get_spec("brats2020")
    synthesize_dataset(root / "raw", cases=5, shape=(32, 32, 32), seed=1037, spec=spec, force=True,
                       progress_bar=False)
    prepare_dataset(root / "raw", root / "cache", spec, min_size=32, progress=False)
    make_split(root / "cache", root / "split", val=0.0, test=0.25, seed=1037,
               missing_rates=[MR2468[m] for m in spec.modalities])
    return root


def test_compare_cli_trains_evaluates_and_reports_every_objective(toy_data):
    from passion.demo import DEMO_CONFIG

    out = toy_data / "compare"
    names = ["baseline", "passion", "ogm_ge", "pmr", "dwa", "uncertainty"]
    cmd = [str(PASSION_BIN), "compare", "--config", str(DEMO_CONFIG), "--objectives", ",".join(names),
           "--seeds", "1037", "--out", str(out), "--set", f"data.cache={toy_data / 'cache'}",
           "--set", f"data.split={toy_data / 'split'}"]
    for s in TOY_SETS:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    report = (out / "report" / "report.md").read_text()
    for name in names:
        assert f"rfnet+{name}" in report, name
        assert (out / f"{name}_s1037" / "eval" / "test" / "results.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["objectives"]) == set(names)
    assert summary["objectives"]["pmr"]["dice"]["WT"]["std"] == 0.0

    # a second seed reuses the finished seed-1037 run and summarises the spread
    before = (out / "pmr_s1037" / "checkpoints" / "last.pt").stat().st_mtime_ns
    from passion.engine.compare import run_comparison

    sets = [f"data.cache={toy_data / 'cache'}", f"data.split={toy_data / 'split'}"] + TOY_SETS
    run_comparison(DEMO_CONFIG, "pmr", "1037,1038", out, overrides=sets, log=lambda *_: None)
    assert (out / "pmr_s1037" / "checkpoints" / "last.pt").stat().st_mtime_ns == before
    summary = json.loads((out / "summary.json").read_text())
    wt = summary["objectives"]["pmr"]["dice"]["WT"]
    per_seed = [json.loads((out / f"pmr_s{s}" / "eval" / "test" / "results.json").read_text())["mean"]["dice"]["WT"]
                for s in (1037, 1038)]
    assert wt["values"] == pytest.approx(per_seed)
    assert wt["mean"] == pytest.approx(sum(per_seed) / 2)
    assert wt["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    assert "pmr_s1038" in (out / "report" / "report.md").read_text()


def test_seed_summary_is_mean_sample_std_min_max_of_each_runs_mean_dice(tmp_path):
    from passion.engine.compare import run_name, summarise_seeds

    dice = {1: 0.5, 2: 0.9, 3: 0.7}
    runs = []
    for seed, value in dice.items():
        run = tmp_path / run_name("pmr", seed)
        (run / "eval" / "test").mkdir(parents=True)
        hd95 = None if seed == 2 else 4.0 * seed  # a run with no HD95 (empty prediction) is left out
        mean = {"dice": {"WT": value}, "hd95": {"WT": hd95}}
        (run / "eval" / "test" / "results.json").write_text(json.dumps({"mean": mean}))
        runs.append(run)
    summary = summarise_seeds(runs, ["pmr"], [1, 2, 3])["objectives"]["pmr"]
    wt = summary["dice"]["WT"]
    assert wt["values"] == [0.5, 0.9, 0.7]
    assert wt["mean"] == pytest.approx(0.7) and wt["std"] == pytest.approx(0.2)
    assert (wt["min"], wt["max"]) == (0.5, 0.9)
    hd = summary["hd95"]["WT"]
    assert hd["mean"] == pytest.approx(8.0) and hd["std"] == pytest.approx(8.0 / 2 ** 0.5)


def test_compare_rejects_unknown_objectives(tmp_path):
    from passion.demo import DEMO_CONFIG
    from passion.engine.compare import run_comparison

    with pytest.raises(ConfigError, match="unknown nope"):
        run_comparison(DEMO_CONFIG, "baseline,nope", "1037", tmp_path, log=lambda *_: None)
    with pytest.raises(ConfigError, match="--seeds"):
        run_comparison(DEMO_CONFIG, "baseline", "x", tmp_path, log=lambda *_: None)
