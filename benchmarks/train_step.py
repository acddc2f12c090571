"""Seconds per training step and peak memory, baseline vs PASSION objective (prints JSON).

One real objective step (losses, PASSION's batched single-modality fusion, backward,
AdamW step) per backbone, objective and precision, each in a fresh subprocess so its peak
RSS is its own. The default mask is PASSION's worst case, all four modalities available
(`--available 2` is closer to the paper's mr2468 split, 1.9 modalities per case on average).
`--dataset myops2020` measures the 2D path instead (3 modalities, 6 classes, size x size slices).

    .venv/bin/python benchmarks/train_step.py --models rfnet --size 80 --steps 2
    .venv/bin/python benchmarks/train_step.py --dataset myops2020 --size 64 --steps 10 --precisions fp32 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from models import _peak_mb, _rss_mb, configure, time_steps  # the same probes as the backbone benchmark


def worker(name: str, objective: str, size: int, steps: int, warmup: int, precision: str,
           threads: int | None, available: int = 4, system_malloc: bool = False,
           dataset: str = "brats2020") -> dict:
    import torch

    from passion.config import ObjectiveConfig
    from passion.data.spec import get_spec
    from passion.method import build_objective
    from passion.models import build_model

    configure(threads, system_malloc)
    torch.manual_seed(0)
    spec = get_spec(dataset)
    m, dims = spec.num_modalities, spec.spatial_dims
    available = min(available, m)
    model = build_model(name, num_modalities=m, num_classes=spec.num_classes, base_width=8,
                        patch_size=(size,) * dims, spatial_dims=dims).train()
    obj = build_objective(objective, ObjectiveConfig(name=objective), num_modalities=m,
                          modality_names=list(spec.modalities), availability_counts=[100] * m,
                          iters_per_epoch=219, setting="idt")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, amsgrad=True)
    target = torch.zeros(1, *(size,) * dims, dtype=torch.long)
    c = size // 2
    for cls, half in ((2, 12), (3, 6), (1, 3)):  # nested cubes (squares in 2D) of three classes
        target[(slice(None),) + (slice(c - half, c + half),) * dims] = cls
    batch = {"image": torch.randn(1, m, *(size,) * dims), "target": target,
             "mask": torch.tensor([[i < available for i in range(m)]])}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = obj(model, batch, 0).loss
        loss.backward()
        opt.step()

    base = _rss_mb()
    times = time_steps(step, warmup, steps)
    return {
        "model": name, "objective": objective, "precision": precision, "dataset": dataset, "size": size,
        "spatial_dims": dims, "batch": 1,
        "available_modalities": available, "system_malloc": system_malloc,
        "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "step_s_median": round(times[len(times) // 2], 3), "step_s_min": round(times[0], 3),
        "peak_rss_mb": round(_peak_mb(), 1), "peak_delta_mb": round(_peak_mb() - base, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["rfnet"])
    ap.add_argument("--objectives", nargs="*", default=["baseline", "passion"])
    ap.add_argument("--size", type=int, default=80)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--available", type=int, default=4, choices=[1, 2, 3, 4],
                    help="modalities available in the sample (PASSION runs one extra fusion per available one)")
    ap.add_argument("--dataset", default="brats2020", choices=["brats2020", "myops2020"],
                    help="brats2020: 3D, 4 modalities, 4 classes; myops2020: 2D, 3 modalities, 6 classes")
    ap.add_argument("--system-malloc", action="store_true",
                    help="measure with glibc's default allocator behaviour (train.reuse_freed_memory=false)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.models[0], args.objectives[0], args.size, args.steps, args.warmup,
                                args.precisions[0], args.threads, args.available, args.system_malloc,
                                args.dataset)))
        return 0
    results = []
    for name in args.models:
        for prec in args.precisions:
            for objective in args.objectives:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", name,
                       "--objectives", objective, "--precisions", prec, "--size", str(args.size),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--available", str(args.available), "--dataset", args.dataset] + (
                           ["--system-malloc"] if args.system_malloc else [])
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    res = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                           {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
                except subprocess.TimeoutExpired:
                    res = {"error": f"timed out after {args.timeout} s"}
                res.update(model=name, objective=objective, precision=prec)
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    # PASSION's cost relative to the baseline, per model and precision
    ratios = {}
    for r in results:
        if r["objective"] == "passion" and "step_s_median" in r:
            base = next((b for b in results if b["objective"] == "baseline" and b["model"] == r["model"]
                         and b["precision"] == r["precision"] and "step_s_median" in b), None)
            if base:
                ratios[f"{r['model']}/{r['precision']}"] = {
                    "time_x": round(r["step_s_median"] / base["step_s_median"], 2),
                    "peak_rss_x": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)}
    print(json.dumps({"results": results, "passion_vs_baseline": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
