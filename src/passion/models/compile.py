"""``train.compile``: torch.compile of a backbone's stages.

Objectives call ``encode`` / ``fuse`` / ``fuse_single`` / ``decode_single``, never ``forward``,
and ``torch.compile(model)`` only compiles ``__call__``. So every submodule the stages call
(each encoder, the transformers, the fusion and single-modality decoders) is compiled in place
with ``nn.Module.compile``: parameter names, state dicts and checkpoints stay the same, and the
mask-dependent Python between them (which encoders run, which pairs are fused) stays eager.
"""
from __future__ import annotations

from torch import nn


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The backbone's direct submodules, the members of a ModuleList counted one by one."""
    units: list[nn.Module] = []
    for child in model.children():
        units.extend(child if isinstance(child, nn.ModuleList) else [child])
    return [u for u in units if any(True for _ in u.parameters())]


def compile_backbone(model: nn.Module, **options) -> list[nn.Module]:
    """Compile the stages' submodules in place (lazily: compilation happens at their first call)."""
    units = compile_units(model)
    for unit in units:
        unit.compile(**options)
    return units
