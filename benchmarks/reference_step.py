"""`train_step.py --reference DIR`: our training step and the paper's, interleaved in one process.

The paper's public code (github.com/Jun-Jie-Shi/PASSION, folder `code/`) is not part of this
repository and is never copied into it: the user points `--reference` at a local checkout (its
`code/` folder, or the repository root that contains it) and this module imports `models/<name>.py`
(baseline) or `models/<name>_passion.py` (PASSION) and `utils/criterions.py` from there. One
reference step is what the inner loop of the paper's `train.py` does for one batch-1 sample in the
`idt` setting after its warm-up epochs (`region_fusion_start_epoch` defaults to 0):

- baseline: `fuse_pred, sep_preds, prm_preds = model(x, mask)`; loss = weighted CE + Dice of the
  fused prediction, of each available modality's separate prediction, and of the four region
  predictions (weights 1/2, 1/4, 1/8, 1/16);
- PASSION: `model(x, mask, target=onehot, temp=4.0)` returns the fused prediction and the per-modality
  sep/KL/prototype losses and distances; loss = fuse + sep*rp_mask + prm + 0.5 kl + 0.1 proto with
  modal_weight = iters_per_epoch / modality count (219 / 100, the same numbers our objective gets
  here) and imb_beta = 1;
- then `optimizer.zero_grad(); loss.backward(); optimizer.step()` with the paper's AdamW (lr 2e-4,
  weight decay 1e-4, AMSGrad). The logging (`.item()` calls, running epoch sums) is not timed.

Same inputs for both: the very tensors of our step (image, the target as one-hot for the paper's
losses, the available-modality mask), batch 1. The model modules' size constants (`H`, `W`, `Z`,
`HWD` set to the patch edge, `patch_size`, the transformer's token grid, to edge // 16) are patched
on the freshly imported module before the model is built. Both steps run in one process, in the
order ours, reference, ours, reference, ..., so they share the thread count and the allocator
settings (`configure()`: glibc reuse of freed memory unless `--system-malloc`; any MALLOC_*/
LD_PRELOAD setting of the environment applies to both). Peak memory on the CPU cannot be split
within one process (with the reuse allocator each side inherits the other's freed pages), so each
side's peak RSS is measured in a fresh process of its own under the same settings.

CUDA shim (`--reference-shim cuda-to-cpu`, the default with `--device cpu`): while a reference
model is built and while each reference step runs, `torch.Tensor.cuda` and `torch.nn.Module.cuda`
return the tensor/module itself, unchanged on the CPU, so an unmodified checkout (which calls
`.cuda()` on masks, zero tensors and loss buffers) runs on the CPU. Nothing else is patched and our
own step never runs under it. `--reference-shim none` runs the reference as it is (a copy already
made CPU-runnable, or `--device cuda`).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

PAPER_TEMP = 4.0  # the paper's options.py: --temp
PAPER_LR, PAPER_WEIGHT_DECAY = 2e-4, 1e-4
PAPER_ITERS_PER_EPOCH, PAPER_MODALITY_COUNT = 219, 100  # modal_weight = iters / count (as our objective here)
_PACKAGES = ("models", "utils")  # the reference's top-level packages (benchmarks/models.py shares the name)
SIZE_CONSTANTS = ("H", "W", "Z", "HWD")


def resolve_dir(path: str | os.PathLike) -> Path:
    """The folder holding the reference's `models/` (DIR itself or DIR/code)."""
    root = Path(path).expanduser().resolve()
    for cand in (root, root / "code"):
        if (cand / "models").is_dir():
            return cand
    raise FileNotFoundError(f"--reference {path}: no models/ folder in it or in its code/ folder")


@contextlib.contextmanager
def cuda_to_cpu_shim(enabled: bool = True):
    """While active, `Tensor.cuda(...)` and `Module.cuda(...)` return the object itself (no copy,
    no device change); restored on exit, also after an exception."""
    import torch

    if not enabled:
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def _package(name: str, folder: Path) -> types.ModuleType:
    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # a namespace package, as upstream
    spec.submodule_search_locations = [str(folder)]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    return mod


def import_reference(ref_dir: Path, module: str) -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh copies of DIR/models/<module>.py and DIR/utils/criterions.py.

    `models` and `utils` are bound to DIR's folders only for the import (sys.path gets DIR in front
    for anything else they import); afterwards the previous `models`/`utils` modules (this folder's
    models.py) are restored, so each call yields independent module objects whose constants can be
    patched without touching another configuration's."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _PACKAGES}
    sys.path.insert(0, str(ref_dir))
    try:
        for pkg in _PACKAGES:
            if (ref_dir / pkg).is_dir():
                _package(pkg, ref_dir / pkg)
        mod = importlib.import_module(f"models.{module}")
        crit = importlib.import_module("utils.criterions")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in _PACKAGES]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path.remove(str(ref_dir))
    return mod, crit


def patch_size_constants(mod: types.ModuleType, size: int) -> dict:
    """Set the module's patch-size constants to `size`; {name: [old, new]} of what changed."""
    changed = {}
    for name in SIZE_CONSTANTS:
        if isinstance(getattr(mod, name, None), int) and getattr(mod, name) != size:
            changed[name] = [getattr(mod, name), size]
            setattr(mod, name, size)
    if isinstance(getattr(mod, "patch_size", None), int) and hasattr(mod, "H"):
        if size % 16:
            raise ValueError(f"{mod.__name__} tokenises the 1/16 feature map: the size must be a multiple of 16")
        if mod.patch_size != size // 16:
            changed["patch_size"] = [mod.patch_size, size // 16]
            mod.patch_size = size // 16
    return changed


def build_reference_step(ref_dir: Path, name: str, objective: str, batch: dict, precision: str = "fp32",
                         device: str = "cpu", shim: bool = True, num_cls: int = 4):
    """A closure running one training step of the paper's model, and a description of it."""
    import torch

    module = name if objective == "baseline" else f"{name}_passion"
    mod, crit = import_reference(ref_dir, module)
    size = batch["image"].shape[-1]
    if batch["image"].dim() != 5 or len(set(batch["image"].shape[2:])) != 1:
        raise ValueError("the paper's code takes cubic 3D patches (brats2020)")
    if size % 8:
        raise ValueError("the paper's encoders downsample three times: the size must be a multiple of 8")
    patched = patch_size_constants(mod, size)
    dev = torch.device(device)
    with cuda_to_cpu_shim(shim):
        torch.manual_seed(0)
        model = mod.Model(num_cls=num_cls).to(dev)
    model.mask_type = "idt"
    model.is_training = True
    model.train()
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": PAPER_LR, "weight_decay": PAPER_WEIGHT_DECAY}],
                            betas=(0.9, 0.999), eps=1e-08, amsgrad=True)
    x = batch["image"]
    mask = batch["mask"].bool().to(x.device)  # the paper's code indexes its features with it
    target = torch.nn.functional.one_hot(batch["target"], num_cls).permute(0, 4, 1, 2, 3).float()
    swl, dice = crit.softmax_weighted_loss, crit.dice_loss
    modal_weight = torch.full((mask.shape[1],), PAPER_ITERS_PER_EPOCH / PAPER_MODALITY_COUNT, device=dev)
    imb_beta = torch.ones(mask.shape[1], device=dev)

    def baseline_loss():
        fuse_pred, sep_preds, prm_preds = model(x, mask)
        fuse_loss = swl(fuse_pred, target, num_cls=num_cls) + dice(fuse_pred, target, num_cls=num_cls)
        sep_loss_m = torch.zeros(mask.shape[1], device=dev)
        for j, sep_pred in enumerate(sep_preds):
            if mask[0, j]:
                sep_loss_m[j] += swl(sep_pred, target, num_cls=num_cls) + dice(sep_pred, target, num_cls=num_cls)
        prm_loss, weight_prm = torch.zeros(1, device=dev), 1.0
        for prm_pred in prm_preds:
            weight_prm /= 2.0
            prm_loss += weight_prm * (swl(prm_pred, target, num_cls=num_cls) + dice(prm_pred, target, num_cls=num_cls))
        return fuse_loss + sep_loss_m.sum() + prm_loss

    def passion_loss():
        fuse_pred, prm_loss, sep_loss_m, kl_loss_m, proto_loss_m, dist_m = model(x, mask, target=target,
                                                                                  temp=PAPER_TEMP)
        fuse_loss = swl(fuse_pred, target, num_cls=num_cls) + dice(fuse_pred, target, num_cls=num_cls)
        dist_avg = dist_m.sum() / mask[0].sum()
        rp_mask = mask[0] * (dist_m / dist_avg - 1) > 0
        kl_loss = (imb_beta * modal_weight * kl_loss_m).sum()
        proto_loss = (rp_mask * modal_weight * proto_loss_m).sum()
        sep_loss = (rp_mask * imb_beta * modal_weight * sep_loss_m).sum()
        return fuse_loss + sep_loss + prm_loss + kl_loss * 0.5 + proto_loss * 0.1

    loss_fn = baseline_loss if objective == "baseline" else passion_loss

    def step():
        with cuda_to_cpu_shim(shim):
            model.is_training = True
            opt.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn()
            loss.backward()
            opt.step()
        return loss.detach()

    info = {"model": name, "objective": objective, "precision": precision, "dataset": "brats2020",
            "size": size, "spatial_dims": 3, "batch": 1, "available_modalities": int(mask[0].sum()),
            "device": device, "params": sum(p.numel() for p in model.parameters()),
            "reference_module": f"models.{module}", "patched_constants": patched,
            "cuda_shim": shim, "temp": PAPER_TEMP if objective == "passion" else None}
    return step, info


# ----------------------------------------------------------------------------------------------
# Workers (run through train_step.py's hidden --reference-worker flag) and the driver.

def _shim_on(args) -> bool:
    return args.reference_shim == "cuda-to-cpu" or (args.reference_shim == "auto" and args.device == "cpu")


def _summary(times: list[float], first: float) -> dict:
    s = sorted(times)
    return {"first_step_s": round(first, 3), "step_s_median": round(s[len(s) // 2], 4),
            "step_s_min": round(s[0], 4), "step_s_all": [round(t, 4) for t in times]}


def interleaved(args, name: str, objective: str, size: int, precision: str, checkpointing: str) -> dict:
    """Both steps in this process, ours then the reference's, warmup + steps times each."""
    import torch

    from models import configure
    from train_step import StepSpec, build_step

    cuda = args.device == "cuda"
    configure(args.threads, args.system_malloc)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as train_step.py --device cuda, for both sides
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ours, ours_info = build_step(StepSpec.from_args(args, name, objective, size, precision, checkpointing))
    ref, ref_info = build_reference_step(resolve_dir(args.reference), name, objective, ours.batch, precision,
                                         args.device, _shim_on(args))
    sides = (("ours", ours), ("reference", ref))
    times = {k: [] for k, _ in sides}
    first = {}
    peaks = {k: [] for k, _ in sides}
    sequence = []
    for i in range(args.warmup + args.steps):
        for key, fn in sides:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            first.setdefault(key, dt)
            sequence.append(key)
            if i >= args.warmup:
                times[key].append(dt)
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                    peaks[key].append((peak, peak - base))
    common = {"steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "system_malloc": args.system_malloc, "interleaved": True, "sequence": sequence}
    out = {"ours": {**ours_info, **common, **_summary(times["ours"], first["ours"])},
           "reference": {**ref_info, **common, **_summary(times["reference"], first["reference"])}}
    if cuda:
        for key in out:
            out[key]["peak_cuda_mb"] = round(max(p for p, _ in peaks[key]) / 2 ** 20, 1)
            out[key]["peak_cuda_delta_mb"] = round(max(d for _, d in peaks[key]) / 2 ** 20, 1)
            out[key]["gpu"] = torch.cuda.get_device_name()
    return out


def reference_memory(args, name: str, objective: str, size: int, precision: str) -> dict:
    """The reference alone in a fresh process (same settings as the interleaved run): peak RSS."""
    import torch

    from models import HeapPeak, _peak_mb, _rss_mb, configure
    from passion.data.spec import get_spec
    from train_step import make_batch

    configure(args.threads, args.system_malloc)
    m = get_spec(args.dataset).num_modalities
    torch.manual_seed(0)
    batch = make_batch(size, 3, m, min(args.available, m), torch.device("cpu"))
    step, _ = build_reference_step(resolve_dir(args.reference), name, objective, batch, precision, "cpu",
                                   _shim_on(args))
    base = _rss_mb()
    with HeapPeak() as heap:
        for _ in range(args.warmup + args.steps):
            step()
    return {"peak_rss_mb": round(_peak_mb(), 1), "peak_delta_mb": round(_peak_mb() - base, 1),
            "peak_heap_mb": heap.mb}


def worker(args) -> dict:
    """Entry of `train_step.py --reference-worker KIND` (one configuration, JSON on stdout)."""
    name, objective, size = args.models[0], args.objectives[0], (args.sizes or [args.size])[0]
    prec, ckpt = args.precisions[0], args.activation_checkpointing[0]
    if args.reference_worker == "interleaved":
        return interleaved(args, name, objective, size, prec, ckpt)
    return reference_memory(args, name, objective, size, prec)


def _subprocess(args, kind: str, name: str, objective: str, size: int, prec: str, ckpt: str,
                steps: int | None = None) -> dict:
    train_step = str(Path(__file__).with_name("train_step.py"))
    cmd = [sys.executable, train_step, "--models", name, "--objectives", objective, "--precisions", prec,
           "--size", str(size), "--steps", str(args.steps if steps is None else steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--available", str(args.available),
           "--dataset", args.dataset, "--base-width", str(args.base_width),
           "--activation-checkpointing", ckpt, "--device", args.device,
           "--reference", str(args.reference), "--reference-shim", args.reference_shim]
    cmd += ["--system-malloc"] if args.system_malloc else []
    cmd += ["--compile"] if args.compile else []
    if kind == "ours-memory":
        cmd += ["--worker", "--heap-peak"]
    else:
        cmd += ["--reference-worker", kind]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{kind}: timed out after {args.timeout} s"}
    if proc.returncode != 0:
        return {"error": f"{kind}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    """Every configuration: the interleaved timing run, then (CPU) one fresh process per side for
    the peak RSS; the JSON object train_step.py prints."""
    from train_step import ratios

    ref_dir = resolve_dir(args.reference)
    if args.dataset != "brats2020":
        raise SystemExit("--reference: the paper's code is 3D BraTS only (--dataset brats2020)")
    ours_results, ref_results, versus = [], [], {}
    mem_key = "peak_cuda_delta_mb" if args.device == "cuda" else "peak_rss_mb"
    for size in args.sizes or [args.size]:
        for name in args.models:
            for prec in args.precisions:
                for ckpt in args.activation_checkpointing:
                    for objective in args.objectives:
                        cfg = {"model": name, "objective": objective, "precision": prec, "size": size,
                               "activation_checkpointing": ckpt}
                        pair = _subprocess(args, "interleaved", name, objective, size, prec, ckpt)
                        if "error" in pair:
                            ours, ref = {**cfg, **pair}, {**cfg, **pair}
                        else:
                            ours, ref = {**pair["ours"], **cfg}, {**pair["reference"], **cfg}
                            if args.device == "cpu":  # peak RSS: each side alone in a fresh process
                                mem = _subprocess(args, "ours-memory", name, objective, size, prec, ckpt, steps=1)
                                keys = ("peak_rss_mb", "peak_delta_mb", "peak_heap_mb", "error")
                                ours.update({k: mem.get(k) for k in keys if k in mem})
                                mem = _subprocess(args, "memory", name, objective, size, prec, ckpt, steps=1)
                                ref.update(mem)
                        ours_results.append(ours)
                        ref_results.append(ref)
                        if "step_s_median" in ours and "step_s_median" in ref:
                            entry = {"time_x": round(ours["step_s_median"] / ref["step_s_median"], 2)}
                            for key in (mem_key, "peak_heap_mb"):
                                if ours.get(key) and ref.get(key):
                                    entry[key.replace("_mb", "_x")] = round(ours[key] / ref[key], 2)
                            key = "/".join(str(cfg[k]) for k in ("model", "objective", "precision", "size"))
                            # the reference has no checkpointing: each of our modes is its own entry
                            versus[key if ckpt == "off" else f"{key}/ckpt-{ckpt}"] = entry
                        print(json.dumps({"ours": ours, "reference": ref}), file=sys.stderr, flush=True)
    def ratios_of(results):  # train_step.ratios over the entries that have a time and a memory
        return ratios([r for r in results if "step_s_median" in r and mem_key.replace("_delta", "") in r])

    return {
        "results": ours_results, "passion_vs_baseline": ratios_of(ours_results),
        "reference": {"dir": str(ref_dir), "cuda_shim": _shim_on(args), "interleaved": "ours, reference, ...",
                      "threads": args.threads, "system_malloc": args.system_malloc,
                      "memory": ("each side's peak RSS, and peak in-use malloc heap (peak_heap_mb), in a fresh "
                                 "process of its own" if args.device == "cpu"
                                 else "per-step peak allocated above the memory in use before the step")},
        "reference_results": ref_results, "reference_passion_vs_baseline": ratios_of(ref_results),
        "ours_vs_reference": versus,
    }
