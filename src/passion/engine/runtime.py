"""Device, precision, threads and host memory: the one place that turns config strings into torch settings."""
from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

from ..config import PRECISIONS
from ..utils import PassionError



def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto'/None -> CUDA (this process's local rank) when available, else CPU; else as given."""
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PassionError(f"device {str(device)!r} requested but CUDA is not available on this machine; "
                           f"use cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast(device: torch.device, precision: str = "fp32"):
    """Autocast context: fp32 (none), bf16 (CPU or CUDA), fp16 (CUDA only)."""
    if precision not in PRECISIONS:
        raise PassionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise PassionError("fp16 needs a CUDA device; use bf16 (or fp32) on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 kernels are native (CUDA, or a CPU with AVX512-BF16/AMX for oneDNN)."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_if_slow_precision(device: torch.device, precision: str) -> str | None:
    """Print (stderr) and return a one-line note when bf16 is asked for on a CPU that only
    emulates it: measured 5-10x slower than fp32 on such a CPU (benchmarks/README.md)."""
    if precision != "bf16" or native_bf16(device):
        return None
    note = ("note: this CPU has no native bf16 (no AVX512-BF16/AMX), so bf16 is emulated and runs "
            "several times slower than fp32 here; --set train.precision=fp32 (or --precision fp32) is faster")
    print(note, file=sys.stderr)
    return note


def configure_host(threads: int | None, reuse_freed_memory: bool = True) -> None:
    """CPU-side settings from the config: intra-op threads (train.threads; None leaves PyTorch's
    default) and train.reuse_freed_memory (see `reuse_freed_memory_in_process`)."""
    if threads:
        torch.set_num_threads(int(threads))
    if reuse_freed_memory:
        reuse_freed_memory_in_process()


_GLIBC_M_TRIM_THRESHOLD = -1
_GLIBC_M_MMAP_MAX = -4
_reusing = False


def reuse_freed_memory_in_process() -> bool:
    """Keep freed host memory in the process for reuse instead of handing it back to the OS.

    glibc serves every block above its mmap threshold (at most 32 MB, so nearly every 3D
    activation) with a fresh mmap and unmaps it on free; the next step then page-faults, and
    the kernel zeroes, gigabytes again. Measured on an 80^3 RFNet training step on 2 CPU
    cores: 25-35% of the wall time was spent there (sys time, 1.5-2.5 M page faults per
    step). Turning mmap off and trimming off makes freed blocks reusable, which is what
    PyTorch's caching allocator does on the GPU. The process keeps its peak footprint until
    it exits. glibc (Linux) only; elsewhere this returns False and changes nothing.
    """
    global _reusing
    if _reusing:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_GLIBC_M_MMAP_MAX, 0) == 1 and libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _reusing = bool(ok)
    return _reusing
