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
from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError, load_config
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


def training_finished(run_dir: Path, epochs: int) -> bool:
    """True when the run's last checkpoint exists and metrics.jsonl records its last epoch."""
    last, metrics = run_dir / "checkpoints" / "last.pt", run_dir / "metrics.jsonl"
    if not last.is_file() or not metrics.is_file():
        return False
    for line in reversed(metrics.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "epoch":
            return rec["epoch"] + 1 >= epochs
    return False


def run_comparison(config: str | Path, objectives: str | Sequence[str], seeds: str | Sequence[int], out: str | Path,
                   overrides: Sequence[str] | None = None, split: str = "test",
                   log: Callable[[str], None] = print) -> Path:
    """Train + evaluate every (objective, seed) under OUT, write OUT/report and OUT/summary.json.

    The first objective is the report's reference for the Dice differences. Returns the report path.
    """
    from ..method import list_objectives
    from ..report.compare import write_comparison_report
    from .evaluate import evaluate
    from .trainer import train

    objectives = parse_list(objectives, "--objectives")
    seeds = parse_list(seeds, "--seeds", int)
    unknown = [o for o in objectives if o not in list_objectives()]
    if unknown:
        raise ConfigError(f"--objectives: unknown {', '.join(unknown)}; choose from {', '.join(list_objectives())}")
    out = Path(out)
    extra = list(overrides or [])
    # validate the config and overrides once, before any work
    load_config(config, extra + [f"run_dir={out / 'check'}", f"objective.name={objectives[0]}"])

    runs: list[Path] = []
    total = len(objectives) * len(seeds)
    for k, (objective, seed) in enumerate(((o, s) for o in objectives for s in seeds), 1):
        run_dir = out / run_name(objective, seed)
        cfg = load_config(config, extra + [f"run_dir={run_dir}", f"objective.name={objective}",
                                           f"train.seed={seed}"])
        if training_finished(run_dir, cfg.train.epochs):
            log(f"[{k}/{total}] {run_dir.name}: training already finished")
        else:
            resume = (run_dir / "checkpoints" / "last.pt").is_file()
            log(f"[{k}/{total}] {run_dir.name}: training {cfg.model.name} with {objective}, seed {seed}, "
                f"{cfg.train.epochs} epochs" + (" - resuming" if resume else ""))
            train(cfg, resume=resume)
        if not (run_dir / "eval" / split / "results.json").is_file():
            log(f"[{k}/{total}] {run_dir.name}: evaluating every modality subset on split {split!r}")
            evaluate(run_dir, split=split, progress=False)
        runs.append(run_dir)

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
            path = by_name[run_name(objective, seed)] / "eval" / split / "results.json"
            if not path.is_file():
                raise PassionError(f"{path} is missing; evaluate the run first")
            mean = json.loads(path.read_text())["mean"]
            for kind in ("dice", "hd95"):
                for region, value in mean.get(kind, {}).items():
                    per_kind.setdefault(kind, {}).setdefault(region, []).append(
                        None if value is None else float(value))
        result["objectives"][objective] = {kind: {r: _spread(v) for r, v in regions.items()}
                                           for kind, regions in per_kind.items()}
    return result
