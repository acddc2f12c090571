"""The run directory: the one module that knows its file layout.

    RUN_DIR/config.yaml                  the run's Config (written when training starts)
            metrics.jsonl                one JSON record per logged iteration and per epoch
            train.log                    the "passion.train" log
            tensorboard/                 TensorBoard events (train.tensorboard)
            checkpoints/last.pt          the newest state; best.pt the best validation; epoch_NNNN.pt kept epochs
            eval/<split>/results.json    an evaluation (written last: it marks the evaluation complete)

Everything else asks this module for these paths. It imports only passion.utils and passion.config, so
that the report reads runs without importing the engine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .utils import PassionError, read_jsonl

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TEXT_LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
RESULTS_FILE = "results.json"  # inside an evaluation folder (RUN_DIR/eval/<split>/ or `evaluate --out`)


def checkpoint_name(which: str | int) -> str:
    """'last' -> last.pt, 'best' -> best.pt, an epoch number (epochs completed) -> epoch_NNNN.pt."""
    return f"epoch_{int(which):04d}.pt" if str(which).isdigit() else f"{which}.pt"


class RunDir:
    """Paths and queries of one run directory; nothing is created or read until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run of a checkpoint file (RUN/checkpoints/x.pt; a loose file: its folder) or of a run dir."""
        path = Path(path)
        if path.is_file():
            return cls(path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent)
        return cls(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def text_log(self) -> Path:
        return self.path / TEXT_LOG_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, which: str | int = "last") -> Path:
        """checkpoints/last.pt, best.pt, or epoch_NNNN.pt for an epoch number."""
        return self.checkpoints / checkpoint_name(which)

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def evaluations(self) -> Path:
        return self.path / EVAL_DIR

    def eval_dir(self, split: str) -> Path:
        return self.evaluations / split

    def results(self, split: str) -> Path:
        return self.eval_dir(split) / RESULTS_FILE

    def results_files(self) -> list[Path]:
        """Every finished evaluation's results file (eval/*/results.json), by split name."""
        return sorted(self.evaluations.glob(f"*/{RESULTS_FILE}"))

    def resolve(self, value: str, what: str) -> Path:
        """A path from the run's config (e.g. data.cache): as given when it exists or is absolute, else
        relative to the run dir or its parent (where the run was trained), else as given."""
        if not value:
            raise PassionError(f"the run's config has no {what}; pass it explicitly")
        p = Path(value)
        if p.exists() or p.is_absolute():
            return p
        for base in (self.path, self.path.parent):
            if (base / p).exists():
                return base / p
        return p

    # ------------------------------------------------------------------ reading
    def read_config(self) -> dict:
        """config.yaml as a plain dict (the report reads older runs' configs without validating them)."""
        import yaml

        return yaml.safe_load(self.config.read_text())

    def load_config(self):
        """config.yaml as a validated Config."""
        from .config import load_config

        return load_config(self.config)

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl ([] when there is none); a line cut by a kill is skipped."""
        return read_jsonl(self.metrics)

    def read_results(self, split: str) -> dict:
        return json.loads(self.results(split).read_text())

    def last_epoch(self) -> dict | None:
        """The newest complete epoch record of metrics.jsonl."""
        return next((r for r in reversed(self.read_metrics()) if r.get("type") == "epoch"), None)

    # ------------------------------------------------------------------ queries
    def is_trained(self, epochs: int | None = None) -> bool:
        """True when last.pt exists and metrics.jsonl records epoch `epochs` (default: the config's
        train.epochs) as done."""
        if not self.last.is_file() or not self.metrics.is_file():
            return False
        record = self.last_epoch()
        if record is None:
            return False
        if epochs is None:
            epochs = self.load_config().train.epochs
        return record["epoch"] + 1 >= epochs

    def is_evaluated(self, split: str) -> bool:
        return self.results(split).is_file()

    # ------------------------------------------------------------------ changing
    def discard_training(self) -> None:
        """`train --force`: remove what an earlier run left (checkpoints, evaluations of its model,
        TensorBoard events, log), so that no best.pt or epoch_N.pt of the old model passes for the new one."""
        for folder in (self.checkpoints, self.evaluations, self.tensorboard):
            if folder.is_dir():
                shutil.rmtree(folder)
        self.text_log.unlink(missing_ok=True)
