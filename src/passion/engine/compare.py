"""`passion compare`: train several objectives with the same backbone, split and seeds, evaluate every
modality subset, and write one comparison report (the paper's "versus balancing methods" table).

Run directories are OUT/<objective>_s<seed>; finished runs are skipped, interrupted ones resume
from their last checkpoint, evaluated ones are not evaluated again, so re-running the same
command continues where it stopped. With several seeds OUT/summary.json holds, per objective,
the mean and spread over seeds of the mean (over subsets) Dice and HD95 per region.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..config import Config, ConfigError, load_config
from ..run_dir import RunDir
from ..utils import PassionError, atomic_write_text


def parse_list(text: str | Sequence, what: str, kind=str) -> list:
    """'a,b' or ['a', 'b'] -> converted, de-duplicated (order kept) list; empty is an error."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"{what}: give at least one value")
    out = []
    for s in items:
        try:
            v = kind(s)
        except ValueError:
            raise ConfigError(f"{what}: {s!r} is not a valid {kind.__name__}") from None
        if v not in out:
            out.append(v)
    return out


def run_name(objective: str, seed: int) -> str:
    return f"{objective}_s{seed}"


def ensure_run(cfg: Config, split: str = "test", *, progress: bool = True, log: Callable[[str], None] = print,
               say: Mapping[str, str] | None = None) -> Path:
    """Train the run of `cfg` unless it has finished its cfg.train.epochs (an interrupted one resumes from
    its last checkpoint), then evaluate it on `split` unless that evaluation exists; returns the run dir.

    `say` holds what to log before each stage: "trained" (nothing left to train), "train" (" - resuming"
    is appended when it resumes) and "evaluate"; a stage without a message is silent."""
    from .evaluate import evaluate
    from .trainer import train

    say = say or {}
    run = RunDir(cfg.run_dir)
    if run.is_trained(cfg.train.epochs):
        if "trained" in say:
            log(say["trained"])
    else:
        resume = run.last.is_file()
        if "train" in say:
            log(say["train"] + (" - resuming" if resume else ""))
        train(cfg, resume=resume)
    if not run.is_evaluated(split):
        if "evaluate" in say:
            log(say["evaluate"])
        evaluate(run.path, split=split, progress=progress)
    return run.path


def run_comparison(config: str | Path, objectives: str | Sequence[str], seeds: str | Sequence[int], out: str | Path,
                   overrides: Sequence[str] | None = None, split: str = "test",
                   log: Callable[[str], None] = print) -> Path:
    """Train + evaluate every (objective, seed) under OUT, write OUT/report and OUT/summary.json.

    The first objective is the report's reference for the Dice differences. Returns the report path.
    """
    from ..method import list_objectives
    from ..report.compare import write_comparison_report

    objectives = parse_list(objectives, "--objectives")
    seeds = parse_list(seeds, "--seeds", int)
    unknown = [o for o in objectives if o not in list_objectives()]
    if unknown:
        raise ConfigError(f"--objectives: unknown {', '.join(unknown)}; choose from {', '.join(list_objectives())}")
    out = Path(out)
    base = load_config(config, list(overrides or []))  # the config and overrides are checked before any work

    runs: list[Path] = []
    total = len(objectives) * len(seeds)
    for k, (objective, seed) in enumerate(((o, s) for o in objectives for s in seeds), 1):
        run_dir = out / run_name(objective, seed)
        cfg = replace(base, run_dir=str(run_dir), objective=replace(base.objective, name=objective),
                      train=replace(base.train, seed=seed))
        head = f"[{k}/{total}] {run_dir.name}:"
        runs.append(ensure_run(cfg, split, progress=False, log=log, say={
            "trained": f"{head} training already finished",
            "train": f"{head} training {cfg.model.name} with {objective}, seed {seed}, {cfg.train.epochs} epochs",
            "evaluate": f"{head} evaluating every modality subset on split {split!r}"}))

    report = write_comparison_report(runs, out / "report", split=split)
    summary = summarise_seeds(runs, objectives, seeds, split)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"report: {report}")
    log(f"summary over seeds: {out / 'summary.json'}")
    return report


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "values": values}
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(finite), "max": max(finite), "values": values}


def summarise_seeds(run_dirs: Sequence[Path], objectives: Sequence[str], seeds: Sequence[int],
                    split: str = "test") -> dict:
    """Per objective and region: mean, sample std (n-1; 0 for one seed), min and max over seeds of the
    run's mean-over-subsets Dice and HD95, plus the per-seed values."""
    by_name = {Path(d).name: Path(d) for d in run_dirs}
    result: dict = {"split": split, "seeds": list(seeds), "statistic": "mean over modality subsets, "
                    "then mean / sample std / min / max over seeds", "objectives": {}}
    for objective in objectives:
        per_kind: dict = {}
        for seed in seeds:
            run = RunDir(by_name[run_name(objective, seed)])
            if not run.is_evaluated(split):
                raise PassionError(f"{run.results(split)} is missing; evaluate the run first")
            mean = run.read_results(split)["mean"]
            for kind in ("dice", "hd95"):
                for region, value in mean.get(kind, {}).items():
                    per_kind.setdefault(kind, {}).setdefault(region, []).append(
                        None if value is None else float(value))
        result["objectives"][objective] = {kind: {r: _spread(v) for r, v in regions.items()}
                                           for kind, regions in per_kind.items()}
    return result
