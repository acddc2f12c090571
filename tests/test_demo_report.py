"""The main job end to end at toy size, and `passion report` on its two runs on its own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from passion.demo import Budget, run_demo

PASSION_BIN = Path(sys.executable).with_name("passion")
# 7 cases: 2 test, 1 val, 4 training (fewer training cases leave a modality in none under mr2468)
TOY = Budget(cases=7, shape=(32, 32, 32), patch=16, epochs=2, iters_per_epoch=2, min_size=32)
TOY_OVERRIDES = ["model.base_width=4", "train.threads=1", "train.precision=fp32"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, budget=TOY, overrides=TOY_OVERRIDES, log=lambda *_: None)
    return out


def test_demo_leaves_a_report_with_both_runs_all_subsets_and_figures(demo_dir):
    report = (demo_dir / "report" / "report.md").read_text()
    for fig in ("delta_dice.png", "training_curves.png", "preference.png"):
        assert (demo_dir / "report" / fig).stat().st_size > 10_000, fig
        assert f"({fig})" in report
    assert "rfnet+baseline" in report and "rfnet+passion" in report
    results = json.loads((demo_dir / "passion" / "eval" / "test" / "results.json").read_text())
    assert len(results["subsets"]) == 15
    dice_table = report.split("## Dice per subset")[1].split("##")[0]
    assert sum(line.startswith("| ") for line in dice_table.splitlines()) == 1 + 15 + 1  # header, subsets, mean
    assert "realised missing" in report and "| flair |" in report
    assert "`objective.name`" in report  # the configs that differ
    paired = report.split("## PASSION versus baseline, paired by seed")[1].split("##")[0]
    assert "paired on 1 seed: WT" in paired and "One seed decides nothing" in paired
    # validation on the demo's val case every epoch: val curves in the report, best.pt in both runs
    assert "Dice on the val cases during training" in report
    for run in ("baseline", "passion"):
        assert (demo_dir / run / "checkpoints" / "best.pt").is_file()
    # both runs' overlays, side by side in one table row
    overlays = report.split("## Overlays")[1].split("\n## ")[0]
    assert "(overlay_rfnet+baseline.png) | ![overlay rfnet+passion](overlay_rfnet+passion.png) |" in overlays
    for run in ("baseline", "passion"):
        assert (demo_dir / "report" / f"overlay_rfnet+{run}.png").stat().st_size > 10_000
        assert (demo_dir / run / "eval" / "test" / "overlay_cases.npz").is_file()


def test_demo_rerun_skips_finished_work(demo_dir):
    before = (demo_dir / "passion" / "checkpoints" / "last.pt").stat().st_mtime_ns
    run_demo(demo_dir, budget=TOY, overrides=TOY_OVERRIDES, log=lambda *_: None)
    assert (demo_dir / "passion" / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_report_cli_on_existing_runs(demo_dir, tmp_path):
    res = subprocess.run([str(PASSION_BIN), "report", str(demo_dir / "baseline"), str(demo_dir / "passion"),
                          "--out", str(tmp_path / "rep")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "rep" / "report.md").is_file()
    res = subprocess.run([str(PASSION_BIN), "report", str(tmp_path), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no config.yaml" in res.stderr
