"""The comparison report's training-split section shows the split `passion split` wrote."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from passion.config import load_config, save_config
from passion.data.spec import get_spec
from passion.data.splits import make_split
from passion.engine import metrics as M
from passion.report.compare import write_comparison_report

SPEC = get_spec("brats2020")
RATES = [0.2, 0.4, 0.6, 0.0]  # flair, t1ce, t1, t2


def _results(dice: float) -> dict:
    """A minimal results.json of `passion evaluate` over all 15 subsets."""
    regions = M.region_names(SPEC)
    subsets = [{"subset_id": i, "subset": SPEC.subset_name(m), "mask": list(m),
                "modalities": M.subset_modalities(SPEC, m),
                "dice": {r: dice for r in regions}, "hd95": {r: 4.0 for r in regions}}
               for i, m in enumerate(SPEC.subsets())]
    return {"format": "passion-eval", "dataset": SPEC.name, "regions": regions, "modalities": list(SPEC.modalities),
            "cases": ["t1", "t2"], "subsets": subsets, "mean": {"dice": {r: dice for r in regions},
                                                                 "hd95": {r: 4.0 for r in regions}},
            "conventions": M.conventions(SPEC)}


def _run(root: Path, name: str, objective: str, dice: float) -> Path:
    """A run directory as `passion train` + `passion evaluate` leave it, trained from `root` with the
    split given relative to it (as `passion train --set data.split=split` records it)."""
    run = root / name
    cfg = load_config(None, [f"run_dir={name}", "data.cache=cache", "data.split=split",
                             f"objective.name={objective}", "train.epochs=1"])
    (run / "eval" / "test").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"type": "iter", "step": 0, "epoch": 0, "loss": 1.0}) + "\n")
    (run / "eval" / "test" / "results.json").write_text(json.dumps(_results(dice)))
    return run


@pytest.fixture
def two_runs(tmp_path):
    """Two runs trained in tmp_path/work on the same split."""
    cases = [f"case{i:02d}" for i in range(20)]
    info = make_split(cases, tmp_path / "work" / "split", val=0.0, test=0.0, seed=3, missing_rates=RATES,
                      spec=SPEC)
    runs = [_run(tmp_path / "work", "a", "baseline", 0.5), _run(tmp_path / "work", "b", "passion", 0.6)]
    return runs, info["train_missing"]


def _section(report: Path) -> str:
    return report.read_text().split("## Training split")[1].split("\n## ")[0]


def test_split_section_has_real_counts_and_realised_rates(two_runs, tmp_path, monkeypatch):
    runs, desc = two_runs
    monkeypatch.chdir(tmp_path)  # not where training ran: the relative data.split still resolves
    section = _section(write_comparison_report(runs, tmp_path / "report"))
    assert "?" not in section
    assert f"{desc['cases']} training cases, {desc['complete_cases']} complete" in section
    assert desc["cases"] == 20 and desc["complete_cases"] > 0
    assert section.count("training cases,") == 1  # one shared split, listed once
    assert "`rfnet+baseline`" in section and "`rfnet+passion`" in section
    for mod, nominal in zip(SPEC.modalities, RATES):
        realised = 100 * desc["missing_rate"][mod]
        assert f"| {mod} | {100 * nominal:.1f} | {realised:.1f} | {desc['present'][mod]} |" in section
    assert any(desc["missing_rate"][m] > 0 for m in SPEC.modalities)
    for subset, n in desc["subset_counts"].items():
        assert f"| {desc['subset_ids'][subset]} | {subset} | {n} |" in section
    assert sum(desc["subset_counts"].values()) == 20


def test_split_section_without_split_json_reads_the_table(two_runs, tmp_path):
    """A split folder holding only the lists and the CSV (e.g. a reference split) is described too."""
    runs, desc = two_runs
    (tmp_path / "work" / "split" / "split.json").unlink()
    section = _section(write_comparison_report(runs[:1], tmp_path / "report"))
    assert "20 training cases" in section and "| t2 |  | 0.0 | 20 |" in section
    for mod in SPEC.modalities:
        assert f"| {mod} |  | {100 * desc['missing_rate'][mod]:.1f} |" in section
    shutil.rmtree(tmp_path / "work" / "split")
    section = _section(write_comparison_report(runs[:1], tmp_path / "report"))
    assert "no split.json or train_missing.csv found" in section
