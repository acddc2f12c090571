"""The rows of one fusion batch: stacked-modality rows, then one-modality rows.

PASSION fuses the same encoder features under the actual mask (the teacher, B rows) and under
P one-hot masks (the students). Only the layers that mix the stacked modalities need to know
which kind a row is: a teacher row holds all M modalities [M, C, *S] (absent ones zero), a
student row only its present modality's [C, *S] (``fuse_single``'s cheap exact path). Every
other layer treats the rows alike, so a fusion decoder given both groups runs those layers once
on all B + P rows instead of once per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Rows:
    """full: [B, M, C, *S] or None; single: [P, C, *S] or None, row p holding modality present[p]."""

    full: Tensor | None = None
    single: Tensor | None = None
    present: Tensor | None = None

    @classmethod
    def of(cls, x: "Tensor | Rows") -> "Rows":
        """A plain stacked tensor [B, M, C, *S] is a batch of full rows."""
        return x if isinstance(x, Rows) else cls(full=x)

    @property
    def num_full(self) -> int:
        return 0 if self.full is None else self.full.shape[0]

    @property
    def num_rows(self) -> int:
        return self.num_full + (0 if self.single is None else self.single.shape[0])

    def one_per_row(self) -> list["Rows"]:
        """Rows of one row each, in row order (full rows first), for row-at-a-time computation."""
        full = [] if self.full is None else [Rows(full=f) for f in self.full.split(1)]
        if self.single is None:
            return full
        return full + [Rows(single=s, present=p) for s, p in zip(self.single.split(1), self.present.split(1))]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.full.shape[3:] if self.full is not None else self.single.shape[2:])

    def apply(self, full_fn: Callable, single_fn: Callable):
        """full_fn(full) and single_fn(single, present), concatenated along the rows (full first).

        Each function returns a tensor or a tuple of tensors; tuples are concatenated elementwise.
        """
        parts = []
        if self.full is not None:
            parts.append(full_fn(self.full))
        if self.single is not None:
            parts.append(single_fn(self.single, self.present))
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(pair, dim=0) for pair in zip(*parts))
        return torch.cat(parts, dim=0)
