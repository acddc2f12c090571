"""Helpers shared by the training tests (tiny rfnet runs on the conftest phantoms)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def tiny_overrides(data: Path, run_dir: Path, objective: str = "passion", **extra) -> list[str]:
    items = {
        "run_dir": run_dir, "data.cache": data / "cache", "data.split": data / "split",
        "model.name": "rfnet", "model.patch_size": 16, "model.base_width": 4,
        "objective.name": objective, "train.epochs": 2, "train.iters_per_epoch": 3,
        "train.precision": "fp32", "train.device": "cpu", "train.threads": 1, "train.lr": 1e-3,
        "train.seed": 7, "data.workers": 0,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def config_file(tmp_path: Path, overrides: list[str]) -> Path:
    from passion.config import apply_overrides

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(apply_overrides({}, overrides), default=str))))
    return path


def safe_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete records (a line cut by a kill is skipped), through the run-dir owner."""
    from passion.run_dir import RunDir

    return RunDir(run_dir).read_metrics()


def train_without_epoch_saves(cfg):
    """Train through the real Trainer, without writing a checkpoint at every epoch end; returns the
    trained model (in train mode).

    For the overfit tests, whose epochs are one step each: saving last.pt (weights and AMSGrad
    state: 55 MB for M2FTrans at width 4) after every step took 13-34 % of a run, and far more on a
    busy disk. Checkpoints have tests of their own (test_train.py, test_checkpointing.py)."""
    from passion.engine.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.save = lambda name: None
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer.model
