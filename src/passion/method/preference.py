"""PASSION's balancing machinery (METHOD.md section 5), as small pure functions plus a state.

- relative preference gate (per iteration, gradient-wise regularisation);
- inverse availability weights w[m] = N_iter / n[m];
- task-wise beta update once per epoch with the eta schedule.

Every batch statistic that feeds the gate or the epoch distances is a *sum over samples*,
so DDP ranks can all-reduce (sum) them and all hold the same gate and beta.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..models.interface import to_device
from ..utils import PassionError

AllReduce = Callable[[Tensor], Tensor]


def identity_all_reduce(t: Tensor) -> Tensor:
    """Single-process default: the local sum is the global sum."""
    return t


def availability_weights(counts: Sequence[int], iters_per_epoch: int, names: Sequence[str],
                         setting: str = "idt") -> Tensor:
    """w[m] = N_iter / n[m] (idt, idt_drop) or 1 (pdt); a modality no case has is a config error."""
    if len(counts) != len(names):
        raise PassionError(f"availability counts ({len(counts)}) do not match modalities ({len(names)})")
    for name, n in zip(names, counts):
        if n <= 0:
            raise PassionError(f"modality {name!r} is absent from every training case; "
                               "remove it from the dataset spec or use another split")
    if setting == "pdt":
        return torch.ones(len(counts))
    if iters_per_epoch <= 0:
        raise PassionError(f"iterations per epoch must be positive, got {iters_per_epoch}")
    return torch.tensor([iters_per_epoch / n for n in counts], dtype=torch.float32)


def relative_preference_sums(d: Tensor, a: Tensor) -> Tensor:
    """rp[m] = sum_b a[b,m] (d[b,m] / dbar_b - 1), dbar_b = sum_m d[b,m] / sum_m a[b,m].

    A sample whose distances are all zero has no preference and contributes 0 (the ratio is
    undefined there). Returned as a sum over samples: all-reducing it across ranks is exact.
    """
    d, a = d.detach().float(), a.float()
    dbar = d.sum(dim=1) / a.sum(dim=1).clamp_min(1.0)  # [B]
    ok = dbar > 0
    ratio = torch.where(ok[:, None], d / torch.where(ok, dbar, torch.ones_like(dbar))[:, None],
                        torch.ones_like(d))
    return (a * (ratio - 1.0)).sum(dim=0)


def preference_gate(rp: Tensor) -> Tensor:
    """gate[m] = rp[m] > 0: keep sep/proto losses only for modalities lagging behind the average."""
    return rp > 0


def grow_eta(eta: float, epoch: int, growth: float, every: int) -> float:
    """eta *= growth at every epoch that is a multiple of `every` (epoch 0 included)."""
    return eta * growth if every > 0 and epoch % every == 0 else eta


def epoch_relative_preference(dist_sum: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """D[m] = epoch sum of d / samples having m; r[m] = (Dbar - D[m]) / Dbar.

    Modalities seen by no sample this epoch get r = 0 and are left out of Dbar; if Dbar is 0
    (no distance at all) every r is 0, so beta only gets renormalised.
    """
    dist_sum, count = dist_sum.double(), count.double()
    seen = count > 0
    D = torch.where(seen, dist_sum / count.clamp_min(1.0), torch.zeros_like(dist_sum))
    if not bool(seen.any()):
        return D.float(), torch.zeros_like(D).float()
    dbar = D[seen].mean()
    if dbar <= 0:
        return D.float(), torch.zeros_like(D).float()
    r = torch.where(seen, (dbar - D) / dbar, torch.zeros_like(D))
    return D.float(), r.float()


def update_beta(beta: Tensor, r: Tensor, eta: float, beta_min: float = 0.1,
                beta_max: float = 4.0) -> Tensor:
    """beta <- clamp(beta - eta * r, min, max), then renormalise to L2 norm sqrt(M)."""
    b = (beta.double() - eta * r.double()).clamp(beta_min, beta_max)
    return (math.sqrt(b.numel()) * b / b.norm()).float()


class PreferenceState:
    """beta, eta and the running epoch distance sums; checkpointable as plain lists/floats."""

    def __init__(self, num_modalities: int, eta: float = 0.01, eta_growth: float = 1.5,
                 eta_growth_every: int = 100, beta_min: float = 0.1, beta_max: float = 4.0):
        self.num_modalities = num_modalities
        self.eta = float(eta)
        self.eta_growth, self.eta_growth_every = float(eta_growth), int(eta_growth_every)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.beta = torch.ones(num_modalities)
        self.device = torch.device("cpu")  # where all_reduce gets its tensor (nccl needs CUDA)
        self.reset_epoch()

    def reset_epoch(self) -> None:
        self.dist_sum = torch.zeros(self.num_modalities, dtype=torch.float64)
        self.count = torch.zeros(self.num_modalities, dtype=torch.float64)

    def accumulate(self, dist_sum: Tensor, count: Tensor) -> None:
        """Add this step's (rank-local) sums of d[., m] and of a[., m]. The running sums live on
        the step's device until the epoch ends or a checkpoint reads them, so a step never waits
        for the device here."""
        self.device = dist_sum.device
        self.dist_sum = to_device(self.dist_sum, self.device) + dist_sum.detach().double()
        self.count = to_device(self.count, self.device) + count.detach().double()

    def end_epoch(self, epoch: int, all_reduce: AllReduce = identity_all_reduce,
                  update: bool = True) -> dict[str, list[float] | float]:
        """All-reduce the epoch sums, grow eta, update beta; returns D, r, beta and eta."""
        both = all_reduce(torch.cat([self.dist_sum, self.count]).to(self.device)).double().cpu()
        D, r = epoch_relative_preference(both[: self.num_modalities], both[self.num_modalities:])
        if update:
            self.eta = grow_eta(self.eta, epoch, self.eta_growth, self.eta_growth_every)
            self.beta = update_beta(self.beta, r, self.eta, self.beta_min, self.beta_max)
        self.reset_epoch()
        return {"distance": D.tolist(), "relative_preference": r.tolist(),
                "beta": self.beta.tolist(), "eta": self.eta}

    def state_dict(self) -> dict:
        return {"beta": self.beta.tolist(), "eta": self.eta,
                "dist_sum": self.dist_sum.tolist(), "count": self.count.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["beta"]) != self.num_modalities:
            raise PassionError(f"objective state has {len(state['beta'])} modalities, "
                               f"this run has {self.num_modalities}")
        self.beta = torch.tensor(state["beta"], dtype=torch.float32)
        self.eta = float(state["eta"])
        self.dist_sum = torch.tensor(state["dist_sum"], dtype=torch.float64)
        self.count = torch.tensor(state["count"], dtype=torch.float64)
