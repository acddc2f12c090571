"""The scientific check on phantoms: baseline vs PASSION, same split (mr2468), several seeds.

For each backbone, trains the baseline and the PASSION objective from the same seeds on the
same imbalanced split of the same phantoms, evaluates every modality subset on the held-out
cases, and prints one JSON object: mean Dice over subsets per region (mean and spread over
seeds) and the per-subset Dice, for each objective, plus PASSION minus baseline.
Re-running with the same --out continues where it stopped (finished runs are reused).

    .venv/bin/python benchmarks/accuracy.py --models rfnet --seeds 1037,1038 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REGIONS = ("WT", "TC", "ET")


def prepare_data(out: Path, cases: int, shape: int, min_size: int, seed: int) -> tuple[Path, Path]:
    from passion.data.preprocess import prepare_dataset
    from passion.data.spec import get_spec
    from passion.data.splits import make_split
    from passion.data.synthetic import synthesize_dataset
    from passion.demo import MR2468

    spec = get_spec("brats2020")
    raw, cache, split = out / "raw", out / "cache", out / "split"
    if not (raw / "synth.json").is_file():
        synthesize_dataset(raw, cases=cases, shape=(shape,) * 3, seed=seed, spec=spec, force=True)
    prepare_dataset(raw, cache, spec, min_size=min_size, progress=False)
    if not (split / "split.json").is_file():
        make_split(cache, split, val=0.0, test=0.25, seed=seed, missing_rates=[MR2468[m] for m in spec.modalities])
    return cache, split


def per_subset_dice(run_dir: Path) -> dict:
    res = json.loads((run_dir / "eval" / "test" / "results.json").read_text())
    return {"+".join(s["modalities"]): {r: s["dice"][r] for r in REGIONS} for s in res["subsets"]}


def mean_dice(run_dir: Path) -> dict:
    res = json.loads((run_dir / "eval" / "test" / "results.json").read_text())
    return {r: res["mean"]["dice"][r] for r in REGIONS}


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": round(mean, 4), "sd": round(sd, 4), "per_seed": [round(v, 4) for v in values]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_accuracy")
    ap.add_argument("--models", default="rfnet")
    ap.add_argument("--seeds", default="1037,1038")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data-seed", type=int, default=1037, help="phantoms and split (fixed across training seeds)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = ap.parse_args(argv)

    from passion.demo import DEMO_CONFIG
    from passion.engine.compare import run_comparison, parse_list

    out = Path(args.out)
    started = time.time()
    cache, split = prepare_data(out / "data", args.cases, args.shape, args.patch, args.data_seed)
    seeds = parse_list(args.seeds, "--seeds", int)
    result = {"budget": {"cases": args.cases, "shape": args.shape, "patch": args.patch, "epochs": args.epochs,
                         "split": "mr2468", "seeds": seeds, "config": str(DEMO_CONFIG), "overrides": args.overrides},
              "models": {}}
    for model in parse_list(args.models, "--models"):
        overrides = [f"data.cache={cache}", f"data.split={split}", f"model.name={model}",
                     f"model.patch_size={args.patch}", f"train.epochs={args.epochs}", *args.overrides]
        model_out = out / model
        run_comparison(DEMO_CONFIG, ["baseline", "passion"], seeds, model_out, overrides=overrides,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
        entry = {}
        for objective in ("baseline", "passion"):
            runs = [model_out / f"{objective}_s{s}" for s in seeds]
            means = [mean_dice(r) for r in runs]
            subsets = [per_subset_dice(r) for r in runs]
            entry[objective] = {
                "mean_dice": {reg: _mean_sd([m[reg] for m in means]) for reg in REGIONS},
                "per_subset_dice": {name: {reg: round(sum(s[name][reg] for s in subsets) / len(subsets), 4)
                                           for reg in REGIONS} for name in subsets[0]},
            }
        entry["passion_minus_baseline"] = {
            reg: _mean_sd([p[reg] - b[reg] for p, b in zip(
                [mean_dice(model_out / f"passion_s{s}") for s in seeds],
                [mean_dice(model_out / f"baseline_s{s}") for s in seeds])]) for reg in REGIONS}
        result["models"][model] = entry
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
