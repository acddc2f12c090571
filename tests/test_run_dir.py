"""The run directory's layout and queries (passion.run_dir), without training anything."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from passion.config import Config, save_config
from passion.run_dir import RunDir
from passion.utils import PassionError


def _epoch(epoch: int) -> str:
    return json.dumps({"type": "epoch", "epoch": epoch, "step": 10 * (epoch + 1)}) + "\n"


def test_layout_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config == tmp_path / "r" / "config.yaml"
    assert run.metrics == tmp_path / "r" / "metrics.jsonl"
    assert run.last == tmp_path / "r" / "checkpoints" / "last.pt"
    assert run.best == tmp_path / "r" / "checkpoints" / "best.pt"
    assert run.checkpoint(7) == run.checkpoint("7") == tmp_path / "r" / "checkpoints" / "epoch_0007.pt"
    assert run.results("test") == tmp_path / "r" / "eval" / "test" / "results.json"


def test_of_maps_checkpoints_back_to_their_run(tmp_path):
    run = RunDir(tmp_path / "r")
    run.checkpoints.mkdir(parents=True)
    for path in (run.last, run.checkpoint(3)):
        path.write_bytes(b"x")
        assert RunDir.of(path).path == run.path
    assert RunDir.of(run.path).path == run.path  # a run dir is its own run
    loose = tmp_path / "elsewhere" / "model.pt"
    loose.parent.mkdir()
    loose.write_bytes(b"x")
    assert RunDir.of(loose).path == loose.parent


def test_a_metrics_line_cut_off_by_a_kill_is_skipped(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text(_epoch(0) + '{"type": "iter", "step": 11}\n' + '{"type": "epoch", "epo')
    assert [r["type"] for r in run.read_metrics()] == ["epoch", "iter"]
    assert run.last_epoch()["epoch"] == 0
    assert RunDir(tmp_path / "none").read_metrics() == []


def test_is_trained_needs_last_checkpoint_and_the_final_epoch_record(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text(_epoch(0) + _epoch(1))
    assert not run.is_trained(2)  # no last.pt
    run.checkpoints.mkdir()
    run.last.write_bytes(b"x")
    assert run.is_trained(2) and run.is_trained(1) and not run.is_trained(3)
    run.metrics.write_text(_epoch(0) + _epoch(1)[:-9])  # the last epoch's line cut by a kill
    assert not run.is_trained(2) and run.is_trained(1)
    # without a number: the epochs of the run's own config
    save_config(replace(Config(), train=replace(Config().train, epochs=1)), run.config)
    assert run.is_trained()


def test_is_evaluated_and_results(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_evaluated("test") and run.results_files() == []
    for split in ("val", "test"):
        run.eval_dir(split).mkdir(parents=True)
        run.results(split).write_text(json.dumps({"split": split}))
    assert run.is_evaluated("test") and not run.is_evaluated("train")
    assert run.read_results("val") == {"split": "val"}
    assert [p.parent.name for p in run.results_files()] == ["test", "val"]


def test_resolve_config_paths_relative_to_the_run(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "cache").mkdir(parents=True)
    run.path.mkdir()
    assert run.resolve("cache", "data.cache") == tmp_path / "runs" / "cache"  # beside the run
    assert run.resolve("/abs/cache", "data.cache").as_posix() == "/abs/cache"
    with pytest.raises(PassionError, match="no data.split"):
        run.resolve("", "data.split")


def test_discard_training_leaves_the_config(tmp_path):
    run = RunDir(tmp_path)
    save_config(Config(), run.config)
    for folder in (run.checkpoints, run.eval_dir("test"), run.tensorboard):
        folder.mkdir(parents=True)
    run.last.write_bytes(b"x")
    run.text_log.write_text("log")
    run.discard_training()
    assert run.config.is_file()
    assert not run.checkpoints.exists() and not run.evaluations.exists() and not run.tensorboard.exists()
    assert not run.text_log.exists()


def test_reading_runs_does_not_import_the_engine():
    code = ("import sys, passion.run_dir, passion.report.compare; "
            "print(any(m.startswith('passion.engine') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
