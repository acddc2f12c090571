"""Device, precision and threads: the one place that turns config strings into torch settings."""
from __future__ import annotations

import contextlib

import torch

from ..utils import PassionError

PRECISIONS = ("fp32", "bf16", "fp16")


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


def apply_threads(threads: int | None) -> None:
    """Intra-op CPU threads from the config (train.threads); None leaves PyTorch's default."""
    if threads:
        torch.set_num_threads(int(threads))
