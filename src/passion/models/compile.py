"""``train.compile``: torch.compile of a backbone's stages.

Objectives call ``encode`` / ``fuse`` / ``fuse_single`` / ``decode_single``, never ``forward``,
and ``torch.compile(model)`` only compiles ``__call__``. So every submodule the stages call
(each encoder, the transformers, the fusion and single-modality decoders) is compiled in place
with ``nn.Module.compile``: parameter names, state dicts and checkpoints stay the same, and the
mask-dependent Python between them (which encoders run, which pairs are fused) stays eager.

On a CPU the option is ignored with a note: Inductor's C++ code generation did not finish the
first RFNet step at 48^3 within 15 minutes on 2 shared cores (benchmarks/README.md), and the
convolutions that dominate a step are library calls it does not speed up.
"""
from __future__ import annotations

import sys

from torch import nn

CPU_NOTE = ("note: train.compile is ignored on the CPU (compiling the first step took over 15 minutes "
            "here, see benchmarks/README.md); it is meant for CUDA")


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The backbone's direct submodules with parameters, the members of a ModuleList one by one."""
    units: list[nn.Module] = []
    for child in model.children():
        units.extend(child if isinstance(child, nn.ModuleList) else [child])
    return [u for u in units if any(True for _ in u.parameters())]


def compile_backbone(model: nn.Module, allow_cpu: bool = False, **options) -> list[nn.Module]:
    """Compile the stages' submodules in place (lazily, at their first call); returns them.

    On a CPU nothing is compiled and a one-line note goes to stderr, unless `allow_cpu`.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not allow_cpu:
        print(CPU_NOTE, file=sys.stderr)
        return []
    units = compile_units(model)
    for unit in units:
        unit.compile(**options)
    return units
