"""Where a training step's time goes: device-busy time, kernel count and the top operators (prints JSON).

For each configuration it builds the same step as `train_step.py` (one real objective step:
losses, backward, AdamW), times `--steps` steps without the profiler, then profiles `--profiled`
more with `torch.profiler` and reports per step:

- `wall_s`: synchronised wall time (median, unprofiled);
- `device_busy_s`: the union of the GPU kernels' intervals (cuda only). `busy_fraction` =
  device_busy_s / wall_s: well below 1 means the GPU waits for the host (launch-bound), and a
  cheaper kernel (bf16, channels-last) cannot shorten the step;
- `kernels`: kernel launches per step (cuda) or operator calls (cpu);
- `top`: the operators with the most self time (device time on cuda, CPU time on cpu).

    python benchmarks/profile_step.py --device cuda --models rfnet --objectives passion --sizes 80 \
        --precisions fp32 bf16
    .venv/bin/python benchmarks/profile_step.py --models m2ftrans --sizes 32 --precisions fp32 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from models import configure
from train_step import StepSpec, build_step, timed_steps


def busy_union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals (kernels of several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profile(spec: StepSpec, steps: int, profiled: int, top: int) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    device = spec.device
    step, info = build_step(spec)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first, times = timed_steps(step, 2, steps, sync)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        sync()
    events = prof.events()
    per_step = 1.0 / profiled
    out = {**info, "first_step_s": round(first, 3), "wall_s": round(times[len(times) // 2], 4)}
    if device == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = busy_union_us([(e.time_range.start, e.time_range.end) for e in kernels]) * 1e-6 * per_step
        out.update(device_busy_s=round(busy, 4), busy_fraction=round(busy / out["wall_s"], 3),
                   kernels=round(len(kernels) * per_step))
        key = "self_device_time_total"
    else:
        out.update(kernels=round(sum(1 for e in events if e.device_type == DeviceType.CPU) * per_step))
        key = "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)
    total = sum(getattr(a, key) for a in averages) or 1.0
    out["top"] = [{"op": a.key[:80], "calls": round(a.count * per_step), "ms": round(getattr(a, key) * 1e-3 * per_step, 2),
                   "share": round(getattr(a, key) / total, 3)} for a in averages[:top]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["rfnet"])
    ap.add_argument("--objectives", nargs="+", default=["baseline", "passion"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[80])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--profiled", type=int, default=2, help="profiled steps")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--available", type=int, default=4, choices=[1, 2, 3, 4])
    ap.add_argument("--channels-last", nargs="+", default=["off"], choices=["off", "on"],
                    help="memory layout(s) to measure: on = channels-last (NDHWC) weights and images")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", default="off", choices=["off", "decoder", "all"])
    args = ap.parse_args(argv)
    configure(args.threads, False)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    results = []
    for size in args.sizes:
        for name in args.models:
            for prec in args.precisions:
                for layout in args.channels_last:
                    for objective in args.objectives:
                        try:
                            spec = replace(StepSpec.from_args(args, name, objective, size, prec,
                                                              args.activation_checkpointing),
                                           channels_last=layout == "on")
                            res = profile(spec, args.steps, args.profiled, args.top)
                        except Exception as exc:  # record and go on with the next configuration
                            res = {"model": name, "objective": objective, "size": size, "precision": prec,
                                   "channels_last": layout == "on",
                                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                        results.append(res)
                        print(json.dumps({k: v for k, v in res.items() if k != "top"}), file=sys.stderr, flush=True)
    print(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
