"""Activation checkpointing of a backbone's blocks (``train.activation_checkpointing``).

A checkpointed block keeps only its inputs for the backward pass and runs its forward again
there (``torch.utils.checkpoint``, non-reentrant, RNG state restored so dropout draws the same
masks): the same values and gradients for less memory and one more forward of those blocks.

Modes: ``off``; ``decoder``: every block that runs after ``encode`` (fusion, transformers after
the encoders, fusion and single-modality decoders), where PASSION's extra passes multiply the
activations; ``all``: the encoders' blocks too, and the objectives recompute their full-resolution
loss terms as well (method/objectives/terms.loss_term reads the mode the backbone records). A
backbone declares which module types are blocks (``checkpoint_blocks``) and which modules make up
``encode`` (``encoder_modules``).

The wrapper replaces ``forward`` on the block instance, so parameter names, state dicts and
checkpoints are the same in every mode.

A block the backbone declares per-row (``per_row_blocks``: row i of its output depends on row i
of its inputs alone) that receives several rows, such as PASSION's batched teacher and student
pass, is checkpointed one row at a time, so its backward recomputes and holds the internals of
one row instead of all of them: the same values up to float rounding (the rows' kernels run
separately; equal to 1e-10 in float64), a smaller peak. Measured in benchmarks/README.md
("Eighth session").
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACTIVATION_CHECKPOINTING
from .rows import Rows


def _num_rows(arg) -> int | None:
    """Rows of a tensor (its leading size) or of models.rows.Rows; None for anything else."""
    if isinstance(arg, Rows):
        return arg.num_rows
    if isinstance(arg, torch.Tensor):
        return arg.shape[0] if arg.dim() else -1
    return None


def _is_plain(arg) -> bool:
    """A value every row takes as it is: None, a number, a string, or a size."""
    if isinstance(arg, (tuple, list)):
        return all(isinstance(v, int) for v in arg)
    return arg is None or isinstance(arg, (int, float, str))


def _rows(args: tuple) -> int:
    """Rows shared by every tensor and Rows argument; 1 when there are none, their counts
    differ, or another argument is not plain (it might hold rows of its own)."""
    counts = {n for n in map(_num_rows, args) if n is not None}
    if len(counts) != 1 or not all(_num_rows(a) is not None or _is_plain(a) for a in args):
        return 1
    return counts.pop()


def _one_per_row(arg, rows: int):
    if isinstance(arg, Rows):
        return arg.one_per_row()
    # split (one autograd node) rather than indexing, so backward joins the rows' gradients once
    return arg.split(1) if isinstance(arg, torch.Tensor) else (arg,) * rows


def _wrap(block: nn.Module, per_row: bool = False) -> None:
    inner = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # inference: nothing to save
            return inner(*args, **kwargs)
        rows = _rows(args) if per_row and not kwargs else 1
        if rows <= 1:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        parts = [_one_per_row(a, rows) for a in args]
        return torch.cat([checkpoint(inner, *row, use_reentrant=False) for row in zip(*parts)])

    block.forward = forward
    block._activation_checkpointed = True


def _unwrap(block: nn.Module) -> None:
    if block.__dict__.pop("_activation_checkpointed", False):
        del block.forward


def outermost_blocks(root: nn.Module, types: tuple[type, ...], skip: set[int] = frozenset()) -> list[nn.Module]:
    """Modules of `types` under root that are not inside another such module (nor in `skip` ids)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in skip:
            return
        if isinstance(module, types):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(root)
    return found


def set_activation_checkpointing(model: nn.Module, mode: str, row_at_a_time: bool = True) -> list[nn.Module]:
    """Checkpoint the blocks that `mode` selects (undoing any earlier mode); returns them.

    `row_at_a_time=False` checkpoints the per-row blocks over all their rows at once, like the
    others: more memory, fewer (larger) kernel calls; for measuring that trade-off on a GPU
    (benchmarks/train_step.py --checkpoint-rows together)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                         f"got {mode!r}")
    for module in model.modules():
        _unwrap(module)
    model.activation_checkpointing = "off"
    if mode == "off":
        return []
    types = tuple(model.checkpoint_blocks)
    if not types:
        raise ValueError(f"{type(model).__name__} declares no checkpoint_blocks, so activation_checkpointing "
                         f"{mode!r} would change nothing")
    skip = set() if mode == "all" else {id(m) for m in model.encoder_modules()}
    blocks = outermost_blocks(model, types, skip)
    per_row = tuple(getattr(model, "per_row_blocks", ())) if row_at_a_time else ()
    for block in blocks:
        _wrap(block, per_row=isinstance(block, per_row))
    model.activation_checkpointing = mode
    return blocks
