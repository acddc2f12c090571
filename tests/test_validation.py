"""Validation during training: val_dice in epoch records, best.pt, evaluate --checkpoint best, exact resume."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from passion.config import ConfigError, load_config
from passion.engine.checkpoint import load_checkpoint
from passion.engine.trainer import Trainer, train
from passion.engine.validation import is_validation_epoch, select_val_cases, validate, validation_interval
from passion.utils import PassionError

from training_helpers import tiny_overrides

PASSION_BIN = Path(sys.executable).with_name("passion")
REGIONS = {"WT", "TC", "ET"}
# the epoch-record fields that legitimately differ between two identical runs
TIMING = ("seconds", "samples_per_s", "val_seconds")


@pytest.fixture(scope="module")
def val_data(tmp_path_factory, tiny_data):
    """The conftest cache with a split of 2 training cases and 1 val case (no test case)."""
    from passion.data.splits import make_split

    root = tmp_path_factory.mktemp("val_data")
    (root / "cache").symlink_to(tiny_data / "cache")
    make_split(root / "cache", root / "split", val=0.34, test=0.0, seed=5, missing_rates=[0.0, 0.0, 0.0, 0.5])
    return root


FEW_SUBSETS = "flair,t1ce+t2"  # for the tests about resume and ranks, not about which subsets are scored


def _val_overrides(data: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"train.iters_per_epoch": 1, **extra})


def _records(run: Path, kind: str = "epoch") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def validated_run(val_data, tmp_path_factory):
    """3 epochs, validation every 2: after epochs 2 and 3 (the last always validates)."""
    run = tmp_path_factory.mktemp("validated") / "run"
    train(load_config(None, _val_overrides(val_data, run, **{"train.epochs": 3, "train.val_every": 2})))
    return run


def test_validation_schedule_and_case_pick():
    assert validation_interval(300, None) == 30 and validation_interval(3, None) == 1
    assert validation_interval(40, 7) == 7
    assert [e for e in range(25) if is_validation_epoch(e, 25, None)] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 24]
    assert [e for e in range(5) if is_validation_epoch(e, 5, 2)] == [1, 3, 4]
    names = [f"c{i:02d}" for i in range(20)]
    pick = select_val_cases(names, 8, seed=1037)
    assert len(pick) == 8 and pick == sorted(pick) and pick == select_val_cases(names, 8, seed=1037)
    assert pick != select_val_cases(names, 8, seed=1038)
    assert select_val_cases(names, None, 1) == names and select_val_cases(names[:3], 8, 1) == names[:3]


def test_val_dice_in_epoch_records_and_best_checkpoint(validated_run):
    epochs = _records(validated_run)
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert "val_dice" not in epochs[0] and "val_score" not in epochs[0]
    scores = []
    for rec in epochs[1:]:
        assert set(rec["val_dice"]) == {"full", "mean"}
        for kind in ("full", "mean"):
            assert set(rec["val_dice"][kind]) == REGIONS
            assert all(0.0 <= v <= 1.0 for v in rec["val_dice"][kind].values())
        assert rec["val_score"] == pytest.approx(np.mean(list(rec["val_dice"]["mean"].values())))
        assert rec["val_cases"] == 1
        scores.append(rec["val_score"])

    best = load_checkpoint(validated_run / "checkpoints" / "best.pt")
    last = load_checkpoint(validated_run / "checkpoints" / "last.pt")
    assert best["best"]["val_score"] == pytest.approx(max(scores))
    assert last["best"] == best["best"]  # a resumed run compares against it
    best_epoch = best["best"]["epoch"]
    assert epochs[best_epoch]["val_score"] == pytest.approx(max(scores))
    assert best["epoch"] == best_epoch + 1 and best["step"] == best["best"]["step"] == best_epoch + 1
    assert last["epoch"] == 3
    log = (validated_run / "train.log").read_text()
    assert "validation on 1 cases" in log


def test_evaluate_checkpoint_best(validated_run, tmp_path):
    from typer.testing import CliRunner

    from passion.cli import _register, app

    _register()
    out = tmp_path / "eval_best"
    r = CliRunner().invoke(app, ["evaluate", str(validated_run), "--checkpoint", "best", "--split", "val",
                                 "--subsets", "full", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    best = load_checkpoint(validated_run / "checkpoints" / "best.pt")
    assert res["checkpoint_name"] == "best" and res["checkpoint"].endswith("best.pt")
    assert res["epoch"] == best["epoch"] and res["best"]["val_score"] == pytest.approx(best["best"]["val_score"])
    assert "Best checkpoint" in (out / "results.md").read_text()


def test_no_val_cases_skips_validation_and_best_is_a_clear_error(tiny_data, tmp_path):
    from passion.engine.evaluate import evaluate

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.epochs": 1, "train.iters_per_epoch": 1})))
    assert all("val_dice" not in r for r in _records(run))
    assert not (run / "checkpoints" / "best.pt").exists()
    assert sum("validation skipped" in line for line in (run / "train.log").read_text().splitlines()) == 1
    with pytest.raises(PassionError, match="no checkpoint best.pt .*never validated"):
        evaluate(run, checkpoint="best", progress=False)
    res = subprocess.run([str(PASSION_BIN), "evaluate", str(run), "--checkpoint", "best", "--no-progress"],
                         capture_output=True, text=True)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "best.pt" in lines[0], res.stderr


def test_validate_leaves_rng_and_train_mode_untouched(val_data):
    from passion.data.cache import read_spec
    from passion.models import build_model

    spec = read_spec(val_data / "cache")
    torch.manual_seed(0)
    model = build_model("rfnet", num_modalities=4, num_classes=4, base_width=4, patch_size=(16, 16, 16)).train()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    names = (val_data / "split" / "val.txt").read_text().split()
    out = validate(model, val_data / "cache", names, spec, roi_size=[16, 16, 16], subsets="t2,full", overlap=0.25)
    assert model.training
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    # "mean" averages the requested subsets only (t2 and the full one)
    assert set(out["val_dice"]["mean"]) == REGIONS and out["val_cases"] == 1
    full_only = validate(model, val_data / "cache", names, spec, roi_size=[16, 16, 16], subsets="full", overlap=0.25)
    assert full_only["val_dice"]["mean"] == full_only["val_dice"]["full"] == out["val_dice"]["full"]


def test_crash_and_resume_with_validation_is_exact(val_data, tmp_path, monkeypatch):
    # two subsets (plus the full one) instead of all 15: validation was 60 % of this test's time
    extra = {"train.epochs": 3, "train.iters_per_epoch": 2, "train.val_every": 1, "train.checkpoint_every_iters": 1,
             "train.val_subsets": FEW_SUBSETS}
    reference = tmp_path / "reference"
    train(load_config(None, _val_overrides(val_data, reference, **extra)))
    # validation consumes no training randomness: the same run without it trains identically
    unvalidated = tmp_path / "unvalidated"
    train(load_config(None, _val_overrides(val_data, unvalidated, **extra, **{"train.val_cases": 0})))

    crashed = tmp_path / "crashed"
    real_step = Trainer._train_step

    def crash_in_epoch_two(self, batch, epoch, lr):
        if self.state.step == 3:  # in the second epoch: after the first validation and a mid-epoch checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, batch, epoch, lr)

    monkeypatch.setattr(Trainer, "_train_step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, _val_overrides(val_data, crashed, **extra)))
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert load_checkpoint(crashed / "checkpoints" / "last.pt")["step"] == 3
    train(load_config(crashed / "config.yaml", [f"run_dir={crashed}"]), resume=True)

    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    for other in (crashed, unvalidated):
        b = load_checkpoint(other / "checkpoints" / "last.pt")
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (other.name, key)
        assert a["objective"] == b["objective"]
    assert load_checkpoint(crashed / "checkpoints" / "last.pt")["best"] == a["best"]
    best_a = load_checkpoint(reference / "checkpoints" / "best.pt")
    best_b = load_checkpoint(crashed / "checkpoints" / "best.pt")
    assert best_a["best"] == best_b["best"] and best_a["step"] == best_b["step"]
    for key in best_a["model"]:
        assert torch.equal(best_a["model"][key], best_b["model"][key]), key
    assert _strip(_records(reference, "iter")) == _strip(_records(crashed, "iter"))
    assert _strip(_records(reference)) == _strip(_records(crashed))
    assert all("val_dice" in r for r in _records(reference))
    assert _strip(_records(unvalidated, "iter")) == _strip(_records(reference, "iter"))
    # each in-process run logs into its own train.log only (no handler left behind)
    assert "resumed from" not in (reference / "train.log").read_text()


@pytest.mark.parametrize("override, message", [
    ("train.val_every=0", "train.val_every must be a positive integer"),
    ("train.val_cases=-1", "train.val_cases must be"),
    ("train.val_subsets=flair+pd", "train.val_subsets"),
])
def test_bad_validation_config_fails_before_training(val_data, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, _val_overrides(val_data, tmp_path / "run") + [override]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_val_dice_figures(tmp_path):
    from passion.report.compare import _training_curves
    from passion.report.figures import val_dice_curves

    def recs(offset):
        out = [{"type": "iter", "epoch": e, "step": e + 1, "loss": 1.0 / (e + 1)} for e in range(4)]
        for e in range(4):
            rec = {"type": "epoch", "epoch": e, "step": e + 1}
            if e % 2:
                dice = {r: 0.2 * e + offset + 0.01 * k for k, r in enumerate(("WT", "TC", "ET"))}
                rec["val_dice"] = {"full": dice, "mean": {r: v - 0.05 for r, v in dice.items()}}
            out.append(rec)
        return out

    path = val_dice_curves({"a": recs(0.0), "b": recs(0.1)}, tmp_path / "val.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert val_dice_curves({"a": [r for r in recs(0.0) if "val_dice" not in r]}, tmp_path / "none.png") is None
    runs = [SimpleNamespace(label="a", metrics=recs(0.0), regions=("WT", "TC", "ET")),
            SimpleNamespace(label="b", metrics=[r for r in recs(0.1) if "val_dice" not in r],
                            regions=("WT", "TC", "ET"))]
    _training_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.train()
        torch.save({"model": trainer.model.state_dict(), "best": trainer.best}, f"{out}/rank{rank}.pt")
    finally:
        trainer.close()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_ranks_validate_once_and_agree_on_the_best(val_data, tmp_path):
    import torch.multiprocessing as mp

    run = tmp_path / "run"
    overrides = _val_overrides(val_data, run, **{"train.epochs": 2, "train.batch_size": 1,
                                                 "train.val_subsets": FEW_SUBSETS})
    mp.spawn(_ddp_worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["best"] == b["best"] is not None
    epochs = _records(run)
    assert [r["epoch"] for r in epochs] == [0, 1] and all("val_dice" in r for r in epochs)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["best"] == a["best"]
