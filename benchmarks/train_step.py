"""Seconds per training step and peak memory, baseline vs PASSION objective (prints JSON).

One real objective step (losses, PASSION's batched single-modality fusion, backward,
AdamW step) per backbone, objective, precision and size. On the CPU every configuration runs
in a fresh subprocess so its peak RSS is its own; on CUDA all run in this process, each with
its own peak ``torch.cuda.max_memory_allocated`` (an out-of-memory configuration is recorded as
an error and the next one runs). The default mask is PASSION's worst case, all four modalities
available (`--available 2` is closer to the paper's mr2468 split, 1.9 modalities per case on
average). `--dataset myops2020` measures the 2D path instead (3 modalities, 6 classes, size x
size slices).

    .venv/bin/python benchmarks/train_step.py --models rfnet --size 80 --steps 2
    .venv/bin/python benchmarks/train_step.py --dataset myops2020 --size 64 --steps 10 --precisions fp32 --threads 1
    python benchmarks/train_step.py --device cuda --models rfnet mmformer m2ftrans --sizes 80 128 --steps 5 --warmup 2
    .venv/bin/python benchmarks/train_step.py --reference ~/PASSION/code --models rfnet mmformer --size 80 \
        --available 3 --precisions fp32 --threads 2 --steps 3   # against the paper's code, interleaved
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from models import HeapPeak, _peak_mb, _rss_mb, configure  # the same probes as the backbone benchmark


def timed_steps(step, warmup: int, steps: int, sync=lambda: None) -> tuple[float, list[float]]:
    """(seconds of the very first step, sorted seconds of the `steps` steps after `warmup` untimed ones).

    The first step (compilation with --compile, cuDNN autotuning on CUDA) is reported on its own.
    """
    times = []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times[0], sorted(times[warmup:])


def make_batch(size: int, dims: int, m: int, available: int, dev) -> dict:
    """One sample: random images, nested cubes (squares in 2D) of three classes as the target, and
    the first `available` of the m modalities marked present."""
    import torch

    target = torch.zeros(1, *(size,) * dims, dtype=torch.long)
    c = size // 2
    for cls, half in ((2, 12), (3, 6), (1, 3)):  # nested cubes (squares in 2D) of three classes
        target[(slice(None),) + (slice(c - half, c + half),) * dims] = cls
    return {"image": torch.randn(1, m, *(size,) * dims).to(dev), "target": target.to(dev),
            "mask": torch.tensor([[i < available for i in range(m)]])}  # on the host, as the trainer keeps it


@dataclass(frozen=True)
class StepSpec:
    """One measured training step: backbone, objective, input and training options.

    `available`: the first `available` modalities are present (PASSION runs one single-modality
    fusion per available one). `mask_on_device` puts the availability mask on the device, which
    makes every shape decision the models take from it wait for the device (the step as it was
    before the ninth session, for an A/B on a GPU). `checkpoint_rows`: "each" (per-row blocks
    recomputed one row at a time, the default) or "together" (all rows at once), under
    checkpointing decoder / all. `channels_last`: model weights and images in channels-last
    memory order (NDHWC / NHWC), the layout cuDNN's tensor-core convolution kernels prefer.
    """

    model: str
    objective: str
    size: int
    precision: str = "fp32"
    device: str = "cpu"
    available: int = 4
    dataset: str = "brats2020"
    base_width: int = 8
    checkpointing: str = "off"
    compile: bool = False
    channels_last: bool = False
    mask_on_device: bool = False
    checkpoint_rows: str = "each"

    @classmethod
    def from_args(cls, args, model: str, objective: str, size: int, precision: str, checkpointing: str,
                  device: str | None = None) -> "StepSpec":
        """The spec of one configuration of this script's (or profile_step's) command line."""
        return cls(model, objective, size, precision, device or args.device, args.available,
                   getattr(args, "dataset", "brats2020"), getattr(args, "base_width", 8), checkpointing,
                   args.compile, bool(getattr(args, "channels_last", False)),
                   getattr(args, "mask_on_device", False), getattr(args, "checkpoint_rows", "each"))


def build_step(spec: StepSpec):
    """A closure running one training step of a freshly built model, and a description of it.

    The step is the trainer's: forward, backward, one read of the loss and logged values, optimizer
    step. The availability mask stays on the host, as the trainer keeps it (see StepSpec for the
    options).
    """
    import torch

    from passion.config import ObjectiveConfig
    from passion.data.spec import get_spec
    from passion.method import build_objective
    from passion.models import build_model

    torch.manual_seed(0)
    dev = torch.device(spec.device)
    data = get_spec(spec.dataset)
    m, dims = data.num_modalities, data.spatial_dims
    available = min(spec.available, m)
    model = build_model(spec.model, num_modalities=m, num_classes=data.num_classes, base_width=spec.base_width,
                        patch_size=(spec.size,) * dims, spatial_dims=dims).to(dev).train()
    if spec.checkpointing != "off":
        model.set_activation_checkpointing(spec.checkpointing, row_at_a_time=spec.checkpoint_rows == "each")
    layout = {3: torch.channels_last_3d, 2: torch.channels_last}[dims] if spec.channels_last else None
    if layout is not None:
        model = model.to(memory_format=layout)
    if spec.compile:
        model.compile_stages(allow_cpu=True)  # the trainer ignores train.compile on a CPU; here it is measured
    obj = build_objective(spec.objective, ObjectiveConfig(name=spec.objective), num_modalities=m,
                          modality_names=list(data.modalities), availability_counts=[100] * m,
                          iters_per_epoch=219, setting="idt")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, amsgrad=True)
    batch = make_batch(spec.size, dims, m, available, dev)
    if spec.mask_on_device:
        batch["mask"] = batch["mask"].to(dev)
    if layout is not None:
        batch["image"] = batch["image"].contiguous(memory_format=layout)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            out = obj(model, batch, 0)
        out.loss.backward()
        out.host_values()
        opt.step()

    step.batch = batch  # `--reference` feeds the very same tensors to the paper's code
    info = {"model": spec.model, "objective": spec.objective, "precision": spec.precision,
            "dataset": spec.dataset, "size": spec.size, "spatial_dims": dims, "batch": 1,
            "base_width": spec.base_width, "available_modalities": available, "device": spec.device,
            "params": sum(p.numel() for p in model.parameters()),
            "activation_checkpointing": spec.checkpointing, "compile": spec.compile,
            "channels_last": spec.channels_last, "mask_on_device": spec.mask_on_device,
            "checkpoint_rows": spec.checkpoint_rows}
    return step, info


def worker(spec: StepSpec, steps: int, warmup: int, threads: int | None, system_malloc: bool = False,
           heap_peak: bool = False) -> dict:
    """One CPU configuration (run in its own process): step times and peak RSS; with `heap_peak`
    also the peak in-use malloc heap, sampled during the steps (which it slows by ~10 %)."""
    import torch

    configure(threads, system_malloc)
    step, info = build_step(spec)
    base = _rss_mb()
    with HeapPeak() if heap_peak else contextlib.nullcontext() as heap:
        first, times = timed_steps(step, warmup, steps)
    return {
        **info, "system_malloc": system_malloc, "first_step_s": round(first, 3),
        "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "step_s_median": round(times[len(times) // 2], 3), "step_s_min": round(times[0], 3),
        "peak_rss_mb": round(_peak_mb(), 1), "peak_delta_mb": round(_peak_mb() - base, 1),
        **({"peak_heap_mb": heap.mb} if heap_peak else {}),
    }


def cuda_run(spec: StepSpec, steps: int, warmup: int) -> dict:
    """One CUDA configuration in this process: synchronised step times and peak allocated memory."""
    import torch

    step = None
    if spec.compile:  # earlier configurations' compiled frames would count against the recompile limit
        torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step, info = build_step(spec)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        first, times = timed_steps(step, warmup, steps, torch.cuda.synchronize)
        peak = torch.cuda.max_memory_allocated()
        return {
            **info, "steps": steps, "warmup": warmup, "gpu": torch.cuda.get_device_name(),
            "first_step_s": round(first, 3),
            "step_s_median": round(times[len(times) // 2], 4), "step_s_min": round(times[0], 4),
            "peak_cuda_mb": round(peak / 2 ** 20, 1), "peak_cuda_delta_mb": round((peak - base) / 2 ** 20, 1),
            "peak_cuda_reserved_mb": round(torch.cuda.max_memory_reserved() / 2 ** 20, 1),
        }
    except torch.cuda.OutOfMemoryError as exc:
        return {"device": "cuda", "size": spec.size, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # record and go on with the next configuration
        return {"device": "cuda", "size": spec.size, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


def cpu_run(args, name: str, objective: str, size: int, prec: str, checkpointing: str) -> dict:
    """One CPU configuration in a fresh subprocess (so that ru_maxrss is its own)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", name,
           "--objectives", objective, "--precisions", prec, "--size", str(size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--available", str(args.available), "--dataset", args.dataset,
           "--base-width", str(args.base_width), "--activation-checkpointing", checkpointing] + (
               ["--system-malloc"] if args.system_malloc else []) + (["--compile"] if args.compile else []) + (
               ["--channels-last"] if args.channels_last else []) + (["--heap-peak"] if args.heap_peak else []) + [
               "--checkpoint-rows", args.checkpoint_rows]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        return (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                {"size": size, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
    except subprocess.TimeoutExpired:
        return {"size": size, "error": f"timed out after {args.timeout} s"}


def ratios(results: list[dict]) -> dict:
    """PASSION's cost relative to the baseline of the same model, precision, size and checkpointing
    (`time_x`, `peak_*_x`), and its memory relative to the baseline without checkpointing."""
    mem_key = "peak_cuda_mb" if any("peak_cuda_mb" in r for r in results) else "peak_rss_mb"
    ok = [r for r in results if "step_s_median" in r]
    varies = {k for k in ("size", "activation_checkpointing") if len({r.get(k) for r in results}) > 1}
    out = {}

    def baseline(r, mode):
        return next((b for b in ok if b["objective"] == "baseline" and b.get("activation_checkpointing") == mode
                     and all(b.get(k) == r.get(k) for k in ("model", "precision", "size"))), None)

    for r in ok:
        if r["objective"] != "passion":
            continue
        key = "/".join(str(r[k]) for k in ("model", "precision", "size", "activation_checkpointing")
                       if k in ("model", "precision") or k in varies)
        entry = {}
        same, off = baseline(r, r.get("activation_checkpointing")), baseline(r, "off")
        if same:
            entry.update(time_x=round(r["step_s_median"] / same["step_s_median"], 2),
                         **{mem_key.replace("_mb", "_x"): round(r[mem_key] / same[mem_key], 2)})
        if off and off is not same:
            entry[mem_key.replace("_mb", "_x_vs_baseline_off")] = round(r[mem_key] / off[mem_key], 2)
        if entry:
            out[key] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["rfnet"])
    ap.add_argument("--objectives", nargs="*", default=["baseline", "passion"])
    ap.add_argument("--size", type=int, default=80, help="cubic (square in 2D) patch edge")
    ap.add_argument("--sizes", type=int, nargs="+", help="several patch edges in one invocation (overrides --size)")
    ap.add_argument("--base-width", type=int, default=8, help="backbone base width (the paper's: 8)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: one subprocess per configuration, peak RSS; cuda: one process, peak allocated")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per CPU configuration")
    ap.add_argument("--available", type=int, default=4, choices=[1, 2, 3, 4],
                    help="modalities available in the sample (PASSION runs one extra fusion per available one)")
    ap.add_argument("--dataset", default="brats2020", choices=["brats2020", "myops2020"],
                    help="brats2020: 3D, 4 modalities, 4 classes; myops2020: 2D, 3 modalities, 6 classes")
    ap.add_argument("--system-malloc", action="store_true",
                    help="measure with glibc's default allocator behaviour (train.reuse_freed_memory=false)")
    ap.add_argument("--activation-checkpointing", nargs="+", default=["off"], choices=["off", "decoder", "all"],
                    help="train.activation_checkpointing mode(s) to measure")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the backbone's stages")
    ap.add_argument("--checkpoint-rows", default="each", choices=["each", "together"],
                    help="with --activation-checkpointing decoder/all: recompute per-row blocks one row at a "
                         "time (each, the default) or all rows at once (together)")
    ap.add_argument("--mask-on-device", action="store_true",
                    help="--device cuda: the availability mask on the GPU, so the models' shape decisions wait "
                         "for it (the step before the trainer kept the mask on the host), for an A/B")
    ap.add_argument("--channels-last", action="store_true",
                    help="weights and images in channels-last memory order (NDHWC), for cuDNN's tensor-core kernels")
    ap.add_argument("--reference", metavar="DIR",
                    help="also time a local checkout of the paper's public code (github.com/Jun-Jie-Shi/PASSION; "
                         "DIR is its code/ folder or the repository root): for every configuration both steps run "
                         "in one process, interleaved (ours, reference, ours, ...), with the same inputs, threads "
                         "and allocator settings (the reference module's H/W/Z/HWD are set to the size, its "
                         "patch_size to size // 16); peak RSS of each side in a fresh process of its own (cuda: "
                         "per-step peak allocated); prints both and ours/reference (see "
                         "benchmarks/reference_step.py). 3D BraTS only")
    ap.add_argument("--reference-shim", default="auto", choices=["auto", "cuda-to-cpu", "none"],
                    help="cuda-to-cpu (auto's choice with --device cpu): while the reference model is built and "
                         "while each reference step runs, torch.Tensor.cuda and torch.nn.Module.cuda return the "
                         "tensor/module itself, unchanged on the CPU, so an unmodified checkout runs on the CPU; "
                         "nothing else is patched and our step never runs under it. none (auto's choice with "
                         "--device cuda): run the reference as it is")
    ap.add_argument("--heap-peak", action="store_true",
                    help="also report peak_heap_mb (cpu): the peak in-use malloc heap (glibc mallinfo2, sampled "
                         "every 2 ms), i.e. peak memory without what the allocator holds freed; the sampling "
                         "slows the steps by ~10 %%, so time separately. --reference's memory runs always do")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-worker", choices=["interleaved", "memory"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = args.sizes or [args.size]
    if args.worker:
        spec = StepSpec.from_args(args, args.models[0], args.objectives[0], sizes[0], args.precisions[0],
                                  args.activation_checkpointing[0], device="cpu")
        print(json.dumps(worker(spec, args.steps, args.warmup, args.threads, args.system_malloc, args.heap_peak)))
        return 0
    if args.reference_worker:
        import reference_step

        print(json.dumps(reference_step.worker(args)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
            return 2
        configure(args.threads, args.system_malloc)
        torch.backends.cudnn.benchmark = True
    if args.reference:
        import reference_step

        print(json.dumps(reference_step.compare(args), indent=2))
        return 0
    results = []
    for size in sizes:
        for name in args.models:
            for prec in args.precisions:
                for ckpt in args.activation_checkpointing:
                    for objective in args.objectives:
                        if args.device == "cuda":
                            res = cuda_run(StepSpec.from_args(args, name, objective, size, prec, ckpt),
                                           args.steps, args.warmup)
                        else:
                            res = cpu_run(args, name, objective, size, prec, ckpt)
                        res.update(model=name, objective=objective, precision=prec, activation_checkpointing=ckpt)
                        results.append(res)
                        print(json.dumps(res), file=sys.stderr, flush=True)
    print(json.dumps({"results": results, "passion_vs_baseline": ratios(results)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
