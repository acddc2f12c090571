"""A run's logs: RUN_DIR/metrics.jsonl (one JSON record per line), optionally TensorBoard, and train.log.

Records are {"type": "iter", "step", ...} per logged iteration and {"type": "epoch", "epoch", ...} per
epoch. Only the main rank writes. A kill can cut the last line; readers skip such lines, and a resume
truncates the log back to its checkpoint so that the resumed log equals an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..run_dir import RunDir
from ..utils import atomic_write_text

log = logging.getLogger("passion.train")


class MetricsLog:
    def __init__(self, run_dir: str | Path, is_main: bool = True, tensorboard: bool = False) -> None:
        self.run = RunDir(run_dir)
        self.path = self.run.metrics
        self.is_main = is_main
        self._tb = self._open_tensorboard() if (tensorboard and is_main) else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("train.tensorboard is on but tensorboard is not installed (pip install 'passion-seg[tensorboard]')")
            return None
        return SummaryWriter(str(self.run.tensorboard))

    def truncate(self, step: int, epoch: int) -> None:
        """Keep iteration records up to `step` and epoch records before `epoch` (the checkpoint's position)."""
        if not self.is_main or not self.path.is_file():
            return
        keep = [r for r in self.run.read_metrics()
                if (r.get("type") == "iter" and r["step"] <= step) or (r.get("type") == "epoch" and r["epoch"] < epoch)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def append(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        tag = record["type"]
        x = record["step"] if tag == "iter" else record["epoch"]
        for key, value in record.items():
            if key in ("type", "epoch", "iteration", "step"):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{tag}/{key}", value, x)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"{tag}/{key}/{sub}", v, x)
                    elif isinstance(v, dict):  # val_dice: {"full"|"mean": {region: dice}}
                        for leaf, w in v.items():
                            if isinstance(w, (int, float)):
                                self._tb.add_scalar(f"{tag}/{key}/{sub}/{leaf}", w, x)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def attach_text_log(run_dir: Path, is_main: bool) -> logging.Handler | None:
    """RUN_DIR/train.log receives the "passion.train" log (main rank); the caller removes the handler."""
    if not is_main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(RunDir(run_dir).text_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
