"""Seconds per case to predict all 2^M-1 modality subsets (prints JSON; asserts nothing).

Compares the evaluator's feature reuse (encode once per window, one batched fuse over the
15 subsets) with the naive way (15 full forward passes per window), at a phantom size and at
the BraTS size 240x240x155, in fp32 and bf16. Every measurement runs in a fresh subprocess so
that its peak resident memory (ru_maxrss) is its own. The model has random weights: speed does
not depend on them.

    .venv/bin/python benchmarks/inference.py --model rfnet --sizes 96 240x240x155 --precisions fp32 bf16
    .venv/bin/python benchmarks/inference.py --model rfnet --sizes 64 --patch 48 --naive   # quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def _parse_size(text: str) -> list[int]:
    parts = [int(p) for p in text.lower().split("x")]
    return parts * 3 if len(parts) == 1 else parts


def _windows(size: list[int], patch: list[int], overlap: float) -> int:
    n = 1
    for s, p in zip(size, patch):
        interval = max(int(p * (1 - overlap)), 1)
        n *= 1 if s <= p else math.ceil((s - p) / interval) + 1
    return n


def worker(args) -> dict:
    import numpy as np
    import torch

    from passion.data.spec import get_spec
    from passion.engine.inference import predict_subsets
    from passion.models import build_model

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import configure

    configure(args.threads, args.system_malloc)
    size, patch = _parse_size(args.size), _parse_size(args.patch)
    spec = get_spec("brats2020")
    torch.manual_seed(0)
    model = build_model(args.model, num_modalities=4, num_classes=4, base_width=args.base_width,
                        patch_size=tuple(patch), spatial_dims=3).eval()
    image = np.random.default_rng(0).normal(size=(4, *size)).astype(np.float32)
    subsets = spec.subsets()
    kw = dict(roi_size=patch, overlap=args.overlap, device="cpu", precision=args.precision,
              reuse_features=args.mode == "reuse", subset_chunk=args.subset_chunk,
              fuse_batch=args.fuse_batch if args.fuse_batch > 0 else None)
    if args.warmup:  # one window, to exclude one-off initialisation from the timing
        predict_subsets(model, image[:, :patch[0], :patch[1], :patch[2]], subsets[:1], **{**kw, "subset_chunk": None})
    t0 = time.perf_counter()
    probs = predict_subsets(model, image, subsets, **kw)
    seconds = time.perf_counter() - t0
    return {"model": args.model, "base_width": args.base_width, "size": size, "patch": patch,
            "overlap": args.overlap, "windows": _windows(size, patch, args.overlap), "subsets": len(subsets),
            "precision": args.precision, "mode": args.mode, "subset_chunk": args.subset_chunk,
            "fuse_batch": (args.fuse_batch or len(subsets)) if args.mode == "reuse" else None,
            "threads": torch.get_num_threads(), "system_malloc": args.system_malloc, "seconds_per_case": round(seconds, 3),
            "output_shape": list(probs.shape), "peak_rss_mb": round(_peak_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rfnet")
    ap.add_argument("--base-width", type=int, default=8)
    ap.add_argument("--sizes", nargs="+", default=["96", "240x240x155"], help="volume sizes after crop, e.g. 96 or 240x240x155")
    ap.add_argument("--patch", default="80", help="sliding-window size (training patch), e.g. 80")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                    help="also time 15 full forward passes per window")
    ap.add_argument("--naive-max-windows", type=int, default=1000,
                    help="skip the naive run where windows x subsets exceeds 15 x this")
    ap.add_argument("--subset-chunk", type=int, default=None)
    ap.add_argument("--fuse-batch", type=int, default=5, help="subsets per fusion call in reuse mode (0: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--system-malloc", action="store_true",
                    help="measure with glibc's default allocator behaviour (train.reuse_freed_memory=false)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="reuse", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    results = []
    for size in args.sizes:
        windows = _windows(_parse_size(size), _parse_size(args.patch), args.overlap)
        for precision in args.precisions:
            modes = ["reuse"] + (["naive"] if args.naive and windows <= args.naive_max_windows else [])
            row = {"size": _parse_size(size), "precision": precision, "windows": windows}
            for mode in modes:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
                       "--base-width", str(args.base_width), "--size", size, "--patch", args.patch,
                       "--overlap", str(args.overlap), "--precision", precision, "--mode", mode,
                       "--warmup" if args.warmup else "--no-warmup"]
                if args.subset_chunk:
                    cmd += ["--subset-chunk", str(args.subset_chunk)]
                cmd += ["--fuse-batch", str(args.fuse_batch)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.system_malloc:
                    cmd.append("--system-malloc")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    row[mode] = {"error": err}
                else:
                    row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"# {size} {precision} {mode}: {row[mode].get('seconds_per_case', row[mode].get('error'))}",
                      file=sys.stderr, flush=True)
            if "seconds_per_case" in row.get("naive", {}) and "seconds_per_case" in row["reuse"]:
                row["speedup"] = round(row["naive"]["seconds_per_case"] / row["reuse"]["seconds_per_case"], 2)
            results.append(row)
    out = {"benchmark": "inference_all_subsets", "model": args.model, "base_width": args.base_width,
           "patch": _parse_size(args.patch), "overlap": args.overlap, "cpu_count": os.cpu_count(),
           "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
