"""Training-patch throughput of the data pipeline for several DataLoader worker counts (prints JSON).

Builds the trainer's own `TrainDataset` (random patch, foreground oversampling, augmentation,
the same (seed, epoch, index) draws) over a prepared cache and times how many samples per
second a `DataLoader` delivers with 0, 4 and 8 workers. Compare `samples_per_s` with the
GPU's training steps per second from `train_step.py --device cuda` (batch 1): a loader slower
than the step starves the GPU.

Without --cache it first writes phantoms (BraTS layout) and prepares them in a temporary folder:

    .venv/bin/python benchmarks/loader.py --cases 8 --shape 160 160 128 --patch 80 --workers 0 4 8
    .venv/bin/python benchmarks/loader.py --cache runs/demo/cache --patch 48 --workers 0 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def make_cache(root: Path, cases: int, shape: list[int], jobs: int) -> tuple[Path, float]:
    from passion.data.preprocess import prepare_dataset
    from passion.data.spec import get_spec
    from passion.data.synthetic import synthesize_dataset

    t0 = time.perf_counter()
    synthesize_dataset(root / "raw", cases=cases, shape=tuple(shape), seed=0, workers=jobs, progress_bar=False)
    prepare_dataset(root / "raw", root / "cache", get_spec("brats2020"), workers=jobs,
                    min_size=min(shape), progress=False)
    return root / "cache", time.perf_counter() - t0


def time_loader(cache: Path, patch: int, workers: int, samples: int, augment: bool,
                foreground_fraction: float, pin_memory: bool) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from passion.data.cache import read_index, read_spec
    from passion.data.datasets import TrainDataset

    spec = read_spec(cache)
    names = sorted(c["name"] for c in read_index(cache)["cases"])
    ds = TrainDataset(cache, names, None, setting="idt_drop", patch_size=(patch,) * spec.spatial_dims,
                      augment=augment, seed=1037, spec=spec, foreground_fraction=foreground_fraction)
    order = [i % len(ds) for i in range(samples)]
    t0 = time.perf_counter()
    loader = DataLoader(torch.utils.data.Subset(ds, order), batch_size=1, shuffle=False,
                        num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available())
    it = iter(loader)
    next(it)  # worker start-up and the first sample (the trainer pays it once per epoch)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(1 for _ in it)
    steady = time.perf_counter() - t1
    return {"workers": workers, "patch": patch, "samples": n + 1, "first_sample_s": round(first, 3),
            "samples_per_s": round(n / steady, 2) if n else None, "augment": augment}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="a prepared cache (default: write phantoms)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    ap.add_argument("--patch", type=int, default=80)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 4, 8])
    ap.add_argument("--samples", type=int, default=64, help="samples timed per worker count")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--foreground-fraction", type=float, default=0.33)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for writing phantoms")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the trainer's main process keeps its threads for the model
    with tempfile.TemporaryDirectory() as tmp:
        cache, made_s = (args.cache, 0.0) if args.cache else make_cache(Path(tmp), args.cases, args.shape, args.jobs)
        results = []
        for w in args.workers:
            r = time_loader(cache, args.patch, w, args.samples, not args.no_augment,
                            args.foreground_fraction, pin_memory=True)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps({"cpu_count": os.cpu_count(), "cases": args.cases if not args.cache else None,
                      "shape": args.shape if not args.cache else None, "cache_build_s": round(made_s, 1),
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
