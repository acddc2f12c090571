"""The scientific check on phantoms: the demo (baseline and PASSION, paired) over several seeds.

Each seed runs exactly `passion demo --seed S` (its own phantoms, mr2468 split, training seed;
the demo's recipe and budget) under OUT/seed_S, so that baseline and PASSION of a seed form a
pair. Prints one JSON object: per objective and seed the full-subset and mean-over-subsets Dice
per region (and the issue's targets, met or not), and the paired difference PASSION minus
baseline per region with a 95 % t-interval over seeds, also grouped by the rarest modality of each
subset. Re-running with the same --out continues where it stopped (finished runs are reused).

    .venv/bin/python benchmarks/accuracy.py --seeds 1,2,3,4,5 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OBJECTIVES = ("baseline", "passion")


def run_seed(out: str, seed: int, budget: str, model: str, dataset: str, overrides: list[str],
             cases: int | None = None) -> str:
    from dataclasses import replace

    from passion.demo import DATASET_BUDGETS, run_demo

    seed_out = Path(out) / f"seed_{seed}"
    chosen = DATASET_BUDGETS[dataset][budget]
    if cases:  # more or fewer phantoms than the budget's (the split fractions stay the demo's)
        chosen = replace(chosen, cases=cases)
    run_demo(seed_out, budget=chosen, model=model, seed=seed, dataset=dataset, overrides=overrides,
             log=lambda msg: print(f"[seed {seed}] {msg}", file=sys.stderr, flush=True))
    return str(seed_out)


def _results(seed_out: Path, objective: str) -> dict:
    return json.loads((seed_out / objective / "eval" / "test" / "results.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_accuracy")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="at least 5 for the paired intervals to mean much")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--model", default="rfnet")
    ap.add_argument("--dataset", default="brats2020")
    ap.add_argument("--cases", type=int, default=None,
                    help="phantoms per seed instead of the budget's (split 60/15/25 as in the demo)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run in parallel; each job then uses train.threads = 2 // jobs (min 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = ap.parse_args(argv)

    from passion.data.spec import get_spec
    from passion.data.splits import training_description
    from passion.engine.metrics import region_names
    from passion.report.paired import full_subset, paired_comparison, t_interval

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    overrides = list(args.overrides)
    if args.jobs > 1:
        overrides.append(f"train.threads={max(1, 2 // args.jobs)}")
    started = time.time()
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        seed_dirs = list(pool.map(run_seed, [str(out)] * len(seeds), seeds, [args.budget] * len(seeds),
                                  [args.model] * len(seeds), [args.dataset] * len(seeds),
                                  [overrides] * len(seeds), [args.cases] * len(seeds)))
    seed_dirs = [Path(d) for d in seed_dirs]
    regions = region_names(get_spec(args.dataset))
    per_objective = {}
    for objective in OBJECTIVES:
        res = [_results(d, objective) for d in seed_dirs]
        full = [{r: full_subset(x)["dice"][r] for r in regions} for x in res]
        mean = [{r: x["mean"]["dice"][r] for r in regions} for x in res]
        per_objective[objective] = {
            "per_seed": {str(s): {"full_subset": f, "mean_over_subsets": m} for s, f, m in zip(seeds, full, mean)},
            "full_subset": {r: t_interval([f[r] for f in full]) for r in regions},
            "mean_over_subsets": {r: t_interval([m[r] for m in mean]) for r in regions},
        }
        if args.dataset == "brats2020":
            per_objective[objective]["targets"] = {
                "full_WT_min_ge_0.85": min(f["WT"] for f in full) >= 0.85,
                "mean_WT_ge_0.70": per_objective[objective]["mean_over_subsets"]["WT"]["mean"] >= 0.70,
                "mean_TC_ge_0.50": per_objective[objective]["mean_over_subsets"]["TC"]["mean"] >= 0.50,
                "mean_WT_min_ge_0.60": min(m["WT"] for m in mean) >= 0.60,
            }
    present = [training_description(d / "split")["present"] for d in seed_dirs]
    paired = paired_comparison([_results(d, "baseline") for d in seed_dirs],
                               [_results(d, "passion") for d in seed_dirs], regions, present)
    result = {"budget": args.budget, "cases": args.cases, "model": args.model, "dataset": args.dataset, "seeds": seeds,
              "overrides": args.overrides, "objectives": per_objective,
              "passion_minus_baseline": paired, "seconds": round(time.time() - started, 1)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
