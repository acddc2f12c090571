"""Trainer: run directory contract, exact resume after SIGKILL, config errors before training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from passion.config import ConfigError, load_config
from passion.engine.checkpoint import load_checkpoint
from passion.engine.trainer import train
from passion.utils import PassionError

from training_helpers import config_file, safe_records, tiny_overrides

PASSION_BIN = Path(sys.executable).with_name("passion")


def _iter_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_run_directory_contract(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_data, run))
    train(cfg)
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    recs = _iter_records(run)
    iters = [r for r in recs if r["type"] == "iter"]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["step"] for r in iters] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for rec in epochs:
        assert set(rec["beta"]) == {"flair", "t1ce", "t1", "t2"}
        assert set(rec["relative_preference"]) == {"flair", "t1ce", "t1", "t2"}
        assert abs(sum(v * v for v in rec["beta"].values()) - 4.0) < 1e-4  # renormalised to sqrt(M)
    for key in ("loss", "fuse", "aux", "sep", "kl", "proto", "distance", "gate", "lr", "samples_per_s"):
        assert key in iters[0], key
    # poly schedule per epoch
    assert iters[0]["lr"] == pytest.approx(1e-3)
    assert iters[3]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)
    # a second start in the same run directory is refused
    with pytest.raises(PassionError, match="--resume"):
        train(cfg)


# Runs `passion train` in-process and SIGKILLs itself right after the checkpoint of step KILL_AT
# is written: a real kill (no cleanup, no atexit) at a known point instead of a timing race.
_KILL_AFTER_STEP = """
import os, signal, sys
from passion.config import load_config
from passion.engine import trainer as T
real_save, kill_at = T.Trainer.save, int(sys.argv[2])
def save(self, name):
    real_save(self, name)
    if name == "last.pt" and self.state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
T.Trainer.save = save
T.train(load_config(sys.argv[1]))
"""


# Every backbone, dropout included (mmFormer, M2FTrans): 2 epochs of 2 iterations, killed after
# step 1 (mid-epoch 0) so that the resumed run builds a new data loader part-way into an epoch.
# Narrow transformers (their dropout, 0.1, unchanged) keep the transformer backbones' runs short.
SMALL = {"rfnet": {}, "mmformer": {"transformer_dim": 16, "mlp_dim": 32, "num_heads": 2},
         "m2ftrans": {"mlp_dim": 32, "num_heads": 2, "depth": 1, "cross_layers": 1}}


@pytest.mark.parametrize("model, patch", [("rfnet", 16), ("mmformer", 32), ("m2ftrans", 32)])
def test_sigkill_and_resume_gives_the_same_weights_and_metrics(tiny_data, tmp_path, model, patch):
    extra = {"model.name": model, "model.patch_size": patch, "train.iters_per_epoch": 2,
             "train.checkpoint_every_iters": 1, **{f"model.options.{k}": v for k, v in SMALL[model].items()}}
    reference = tmp_path / "reference"
    train(load_config(None, tiny_overrides(tiny_data, reference, **extra)))

    killed = tmp_path / "killed"
    cfg_file = config_file(tmp_path, tiny_overrides(tiny_data, killed, **extra))
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_STEP, str(cfg_file), "1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 1

    train(load_config(killed / "config.yaml", [f"run_dir={killed}"]), resume=True)

    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["objective"] == b["objective"]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in recs]
    assert strip(_iter_records(reference)) == strip(_iter_records(killed))


def test_resume_with_a_different_model_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, run, **{"train.epochs": 1, "train.iters_per_epoch": 1})))
    cfg = load_config(run / "config.yaml", [f"run_dir={run}", "model.base_width=8"])
    with pytest.raises(PassionError, match="different model config.*model.base_width"):
        train(cfg, resume=True)


@pytest.mark.parametrize("override, message", [
    ("model.name=unet9000", "unknown model 'unet9000'"),
    ("objective.name=magic", "objective.name must be one of"),
    ("data.setting=sometimes", "data.setting must be one of"),
    ("train.lr=-0.1", "train.lr must be a positive number"),
    ("model.patch_size=64", "larger than case"),
])
def test_bad_config_fails_before_training_with_one_line(tiny_data, tmp_path, override, message):
    run = tmp_path / "run"
    cfg_file = config_file(tmp_path, tiny_overrides(tiny_data, run) + [override])
    res = subprocess.run([str(PASSION_BIN), "train", "--config", str(cfg_file)], capture_output=True, text=True)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (run / "checkpoints").exists()


def test_modality_absent_from_every_training_case_is_a_config_error(tiny_data, tmp_path):
    from passion.data.splits import make_split

    split = tmp_path / "split_no_t2"
    make_split(tiny_data / "cache", split, val=0.0, test=0.34, seed=5, missing_rates=[0.0, 0.0, 0.0, 0.0])
    table = split / "train_missing.csv"
    lines = table.read_text().splitlines()
    rows = [lines[0]] + [line.split(",")[0] + ',10,"[True, True, True, False]","[1, 2, 3, 5, 6, 9, 10]"'
                         for line in lines[1:]]
    table.write_text("\n".join(rows) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "run", **{"data.split": split}))
    with pytest.raises(ConfigError, match="modality 't2' is present in no training case"):
        train(cfg)
