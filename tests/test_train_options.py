"""Training options that change what a run does or writes: log_every and the epoch means,
save_epochs, grad_clip, --force, TensorBoard; and activation checkpointing, which must not."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from passion.config import load_config
from passion.engine.checkpoint import load_checkpoint
from passion.engine.trainer import Trainer, train

from training_helpers import tiny_overrides

TIMING = ("seconds", "samples_per_s")


def _records(run, kind):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def every_iteration(tiny_data, tmp_path_factory):
    """2 epochs x 3 iterations, every iteration logged: the reference for the options below."""
    run = tmp_path_factory.mktemp("every") / "run"
    train(load_config(None, tiny_overrides(tiny_data, run)))
    return run


def test_epoch_records_hold_the_mean_of_every_iteration(every_iteration):
    iters, epochs = _records(every_iteration, "iter"), _records(every_iteration, "epoch")
    assert [r["step"] for r in iters] == [1, 2, 3, 4, 5, 6]
    for epoch, rec in enumerate(epochs):
        mine = [r for r in iters if r["epoch"] == epoch]
        assert rec["mean_loss"] == pytest.approx(_mean([r["loss"] for r in mine]), rel=1e-12)
        assert rec["mean_fuse"] == pytest.approx(_mean([r["fuse"] for r in mine]), rel=1e-12)
        for m in ("flair", "t1ce", "t1", "t2"):  # per-modality objects are averaged per modality
            assert rec["mean_sep"][m] == pytest.approx(_mean([r["sep"][m] for r in mine]), rel=1e-12)
        assert not any(k in rec for k in ("mean_lr", "mean_step", "mean_beta", "mean_seconds"))


def test_activation_checkpointing_trains_the_same_run(every_iteration, tiny_data, tmp_path):
    """PASSION through the trainer with `all` (per-row blocks recomputed row by row): the same
    losses as without checkpointing up to fp32 rounding. Only the first steps are compared:
    the rows' separate kernels round differently, and Adam turns rounding-level gradients (conv
    biases before an instance norm, whose exact gradient is zero) into lr-sized steps, so later
    steps drift apart as any two fp32 runs with different kernels do. Equality of the values and
    gradients themselves is tested in float64 (test_checkpointing.py)."""
    run = tmp_path / "all"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.activation_checkpointing": "all"})))
    mine, ref = _records(run, "iter"), _records(every_iteration, "iter")
    assert [r["step"] for r in mine] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(mine[:3], ref[:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert all(math.isfinite(r["loss"]) for r in mine)


def test_log_every_thins_the_log_but_not_the_epoch_means_and_save_epochs_keeps_those_epochs(
        every_iteration, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.log_every": 2, "train.save_epochs": "[1]"})))
    iters = _records(run, "iter")
    assert [r["step"] for r in iters] == [2, 3, 4, 6]  # every 2nd step and each epoch's last
    reference = {r["step"]: r for r in _records(every_iteration, "iter")}
    assert iters == [reference[r["step"]] for r in iters]  # logging does not change training
    assert _records(run, "epoch") == _records(every_iteration, "epoch")  # means over all 3 iterations
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["epoch_0001.pt", "last.pt"]
    first = load_checkpoint(run / "checkpoints" / "epoch_0001.pt")
    assert (first["epoch"], first["step"]) == (1, 3)
    last = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert not any(torch.equal(v, last[k]) for k, v in first["model"].items() if v.is_floating_point() and v.numel() > 1)


def _gradient_norms(cfg) -> list[float]:
    """Total gradient norm the optimiser steps with, at every iteration."""
    trainer = Trainer(cfg)
    norms, step = [], trainer.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    try:
        trainer.train()
    finally:
        trainer.close()
    return norms


def test_grad_clip_bounds_the_gradient_the_optimiser_steps_with(tiny_data, tmp_path):
    short = {"train.epochs": 1, "train.iters_per_epoch": 2}
    free = _gradient_norms(load_config(None, tiny_overrides(tiny_data, tmp_path / "free", **short)))
    clip = min(free) / 4
    clipped = _gradient_norms(load_config(None, tiny_overrides(tiny_data, tmp_path / "clipped", **short,
                                                               **{"train.grad_clip": clip})))
    assert len(clipped) == 2 and all(n == pytest.approx(clip, rel=1e-4) for n in clipped), (free, clipped)


def test_force_starts_over_without_the_previous_runs_files(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = tiny_overrides(tiny_data, run, **{"train.epochs": 2, "train.iters_per_epoch": 1,
                                              "train.save_epochs": "[1]"})
    train(load_config(None, first))
    (run / "eval" / "test").mkdir(parents=True)
    (run / "eval" / "test" / "results.json").write_text("{}")  # an evaluation of the old model
    again = tiny_overrides(tiny_data, run, **{"train.epochs": 1, "train.iters_per_epoch": 1, "train.lr": 5e-4})
    train(load_config(None, again), force=True)
    assert [r["step"] for r in _records(run, "iter")] == [1]  # one fresh log
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert not (run / "eval").exists()
    assert load_config(run / "config.yaml").train.lr == 5e-4
    log = (run / "train.log").read_text()
    assert log.count("epoch 0 done") == 1 and "epoch 1 done" not in log


class _FakeWriter:
    written: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, tag, value, step):
        self.written.append((tag, value, step))

    def close(self):
        self.written.append(("closed", None, None))


def test_tensorboard_gets_every_logged_scalar(tiny_data, tmp_path, monkeypatch):
    """The writer sees each metrics.jsonl number: iterations by step, epochs by epoch, nested keys."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.written = []
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.tensorboard": True, "train.epochs": 1,
                                                              "train.iters_per_epoch": 2})))
    got = {(tag, step): value for tag, value, step in _FakeWriter.written}
    iters, (epoch,) = _records(run, "iter"), _records(run, "epoch")
    for rec in iters:
        assert got[("iter/loss", rec["step"])] == rec["loss"]
        assert got[("iter/sep/t2", rec["step"])] == rec["sep"]["t2"]
    assert got[("epoch/mean_loss", 0)] == epoch["mean_loss"]
    assert got[("epoch/beta/flair", 0)] == epoch["beta"]["flair"]
    assert _FakeWriter.written[-1][0] == "closed"


def test_tensorboard_without_the_package_warns_and_trains(tiny_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.tensorboard": True, "train.epochs": 1,
                                                              "train.iters_per_epoch": 1})))
    assert "tensorboard is not installed" in caplog.text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1 and not (run / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install 'passion-seg[tensorboard]')")
def test_tensorboard_event_files_when_installed(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.tensorboard": True, "train.epochs": 1,
                                                              "train.iters_per_epoch": 1})))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
