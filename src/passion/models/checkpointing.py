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
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACTIVATION_CHECKPOINTING


def _wrap(block: nn.Module) -> None:
    inner = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # inference: nothing to save
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

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


def set_activation_checkpointing(model: nn.Module, mode: str) -> list[nn.Module]:
    """Checkpoint the blocks that `mode` selects (undoing any earlier mode); returns them."""
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
    for block in blocks:
        _wrap(block)
    model.activation_checkpointing = mode
    return blocks
