"""Forward+backward time and peak memory of every backbone (prints JSON; asserts nothing).

Every (backbone, precision) pair runs in a fresh subprocess so that its peak resident
memory is its own. Peak memory is the process high-water mark (ru_maxrss, or psutil when
installed for the baseline); ``peak_delta_mb`` subtracts the resident size after building
the model and the inputs, i.e. it is what the training step itself needs.

    .venv/bin/python benchmarks/models.py --models rfnet --size 80 --steps 3
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time


def _rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapPeak:
    """Peak bytes the process has allocated through malloc (glibc ``mallinfo2``: in-use heap chunks
    plus mmapped blocks), sampled every `period` seconds in a thread while the block runs.

    Unlike peak RSS this leaves out what the allocator holds freed (fragmentation, and everything
    kept under train.reuse_freed_memory): the memory the step's tensors really needed at once, up
    to the sampling period. ``mb`` is None where glibc's mallinfo2 is unavailable.

        with HeapPeak() as heap:
            step()
        heap.mb
    """

    def __init__(self, period: float = 0.002):
        self.period, self.mb = period, None
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None

    def _in_use(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        peak = self._in_use()
        while not self._stop.is_set():
            peak = max(peak, self._in_use())
            self._stop.wait(self.period)
        self._peak = max(peak, self._in_use())

    def __enter__(self) -> "HeapPeak":
        if self._mallinfo2 is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._mallinfo2 is not None:
            self._stop.set()
            self._thread.join()
            self.mb = round(self._peak / 2 ** 20, 1)


def configure(threads: int | None, system_malloc: bool) -> None:
    """The product's host settings (engine/runtime.py); --system-malloc measures glibc's default,
    which returns every freed large block to the OS and page-faults it back on the next step."""
    from passion.engine.runtime import configure_host

    configure_host(threads, reuse_freed_memory=not system_malloc)


def time_steps(step, warmup: int, steps: int) -> list[float]:
    """Run `step` warmup times untimed, then `steps` times timed; sorted wall seconds."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)


def worker(name: str, size: int, steps: int, warmup: int, precision: str, threads: int | None,
           system_malloc: bool = False) -> dict:
    import torch

    from passion.models import build_model

    configure(threads, system_malloc)
    torch.manual_seed(0)
    model = build_model(name, num_modalities=4, num_classes=4, base_width=8,
                        patch_size=(size, size, size), spatial_dims=3).train()
    x = torch.randn(1, 4, size, size, size)
    mask = torch.ones(1, 4, dtype=torch.bool)
    autocast = precision == "bf16"

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feats = model.encode(x, mask)
            out = model.fuse(feats, mask)
            loss = out.logits.float().square().mean()
            loss = loss + sum(a.float().square().mean() for a in out.aux_logits)
            loss = loss + model.decode_single(feats, mask).float().square().mean()
        loss.backward()

    base = _rss_mb()
    times = time_steps(step, warmup, steps)
    return {
        "model": name, "precision": precision, "size": size, "batch": 1, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "system_malloc": system_malloc,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s_median": round(times[len(times) // 2], 4), "step_s_min": round(times[0], 4),
        "peak_rss_mb": round(_peak_mb(), 1), "peak_delta_mb": round(_peak_mb() - base, 1),
        "what": "encode + fuse + decode_single forward and backward, full modality mask",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="backbones (default: all registered)")
    ap.add_argument("--size", type=int, default=80, help="cubic patch edge (default 80)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per (model, precision) run before it is reported as timed out")
    ap.add_argument("--system-malloc", action="store_true",
                    help="measure with glibc's default allocator behaviour (train.reuse_freed_memory=false)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(args.models[0], args.size, args.steps, args.warmup, args.precisions[0], args.threads,
                     args.system_malloc)
        print(json.dumps(res))
        return 0

    from passion.models import list_models

    names = args.models or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(list_models())}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        for prec in args.precisions:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", name, "--precisions", prec,
                   "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.system_malloc:
                cmd.append("--system-malloc")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results.append({"model": name, "precision": prec, "error": f"timed out after {args.timeout} s"})
            else:
                if proc.returncode:
                    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    results.append({"model": name, "precision": prec, "error": err})
                else:
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress, one line per run
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
