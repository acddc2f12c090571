"""Multi-task loss balancers over the per-modality losses: DWA and uncertainty weighting.

Both treat the M single-modality segmentation losses L_sep[m] (shared single-modality decoder
on modality m's encoder features, METHOD.md section 4) as M tasks and re-weight them; the fused
and auxiliary losses keep weight 1, so with all weights 1 both reduce to ``baseline``:

    L = L_fuse + L_aux + sum_m lambda[m] * L_sep[m],   L_sep[m] = (1/B) sum_b a[b,m] Seg(p_m, y)

What had to be adapted for segmentation with per-modality encoders and missing modalities:
- a "task loss" is a per-modality mean over the samples that HAVE the modality (sum of
  a[b,m] * Seg over the batch divided by the number of such samples), so a modality missing
  from 80% of the cases is not mistaken for one with a small loss;
- those sums and counts are all-reduced (summed over DDP ranks) before they decide a weight,
  so every rank applies the same weights;
- a modality absent from a whole epoch (DWA) or a batch (uncertainty) keeps its previous
  statistics instead of producing 0/0.

Both build on the baseline's loss pieces (``terms.seg_terms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...models.interface import to_device
from .base import ObjectiveOutput, Objective, Options, StatInfo, Stats, register_objective
from .terms import SEG_STATS, SegTerms, modality_sums, seg_terms, stats_of

# the per-modality multipliers lambda[m] of L_sep[m], logged by both balancers
LOSS_WEIGHT = StatInfo("loss weight λ")


@dataclass
class DWAOptions(Options):
    temperature: float = 2.0  # T of the softmax over loss ratios (paper: 2.0)

    def rules(self):
        yield "temperature", self.temperature > 0, "must be > 0"


@dataclass
class UncertaintyOptions(Options):
    momentum: float = 0.9  # of the loss EMA
    min_weight: float = 0.1
    max_weight: float = 10.0

    def rules(self):
        yield "momentum", 0 <= self.momentum < 1, "must be in [0, 1)"
        yield "min_weight", self.min_weight > 0, "must be > 0"
        yield "max_weight", self.max_weight >= self.min_weight, "must be >= min_weight"


class WeightedSepObjective(Objective):
    """L = L_fuse + L_aux + sum_m lambda[m] L_sep[m] with lambda from `sep_weights` (a [M] tensor)."""

    stats = {**SEG_STATS, "loss_weight": LOSS_WEIGHT}

    def sep_weights(self, terms: SegTerms, epoch: int) -> Tensor:
        return torch.ones(self.num_modalities)

    def extra_stats(self) -> dict[str, Tensor]:
        return {}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        terms = seg_terms(self, model, batch, epoch)
        lam = to_device(self.sep_weights(terms, epoch), terms.sep_bm.device, torch.float32)
        sep_m = terms.sep_m
        loss = terms.l_fuse + terms.l_aux + (lam * sep_m).sum()
        scalars = {"loss": loss, "fuse": terms.l_fuse, "aux": terms.l_aux}
        stats = stats_of(scalars, {"sep": sep_m, "loss_weight": lam, **self.extra_stats()}, self.modality_names)
        return ObjectiveOutput(loss, stats)


# ---------------------------------------------------------------- DWA

@register_objective("dwa")
class DWAObjective(WeightedSepObjective):
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019) over the per-modality losses.

    Mechanism: lambda[m](t) = M * exp(w_m(t-1) / T) / sum_k exp(w_k(t-1) / T), with
    w_m(t-1) = Lbar_m(t-1) / Lbar_m(t-2) the ratio of the last two epoch-mean losses: a modality
    whose loss decreases more slowly gets more weight. lambda = 1 for the first two epochs.
    Options: temperature T (paper: 2.0).

    Adaptation: Lbar_m is the mean of Seg(p_m, y) over the epoch's samples that have modality m
    (sums and counts all-reduced at the end of the epoch); a modality without samples in one of
    the two epochs keeps weight 1 and the softmax runs over the others (scaled to their number).
    The weights only change at epoch boundaries and are part of the checkpointed state (the loss
    history), so a resumed run applies the same weights.
    """

    options_type = DWAOptions
    stats = {**WeightedSepObjective.stats, "epoch_sep": StatInfo("epoch-mean sep loss over the cases having it")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history: list[list[float]] = []  # epoch-mean losses, last two epochs (nan: not seen)
        self.lam = torch.ones(self.num_modalities)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros(self.num_modalities, dtype=torch.float64)
        self.count = torch.zeros(self.num_modalities, dtype=torch.float64)
        self._device = torch.device("cpu")

    def sep_weights(self, terms: SegTerms, epoch: int) -> Tensor:
        # rank-local sums; all-reduced once at the end of the epoch (exact: sums of sums)
        self._device = terms.sep_bm.device
        # kept on the device until the epoch ends: no wait for it here
        step_sum = (terms.sep_bm.detach().double() * terms.a.double()).sum(dim=0)
        self.loss_sum = to_device(self.loss_sum, self._device) + step_sum
        self.count = to_device(self.count, self._device) + terms.a.double().sum(dim=0)
        return self.lam

    @staticmethod
    def weights_from_history(history: list[list[float]], temperature: float) -> Tensor:
        """lambda from the last two epoch means (ones until there are two)."""
        m = len(history[-1]) if history else 0
        if len(history) < 2:
            return torch.ones(m) if m else torch.ones(0)
        prev, last = torch.tensor(history[-2], dtype=torch.float64), torch.tensor(history[-1], dtype=torch.float64)
        ok = torch.isfinite(prev) & torch.isfinite(last) & (prev > 0)
        w = torch.ones_like(prev)
        if bool(ok.any()):  # softmax over the modalities seen in both epochs; the others keep 1
            ratio = last[ok] / prev[ok]
            w[ok] = torch.softmax(ratio / temperature, dim=0) * ratio.numel()
        return w.float()

    def end_epoch(self, epoch: int) -> Stats:
        both = self.all_reduce(torch.cat([self.loss_sum, self.count]).to(self._device)).double().cpu()
        m = self.num_modalities
        s, n = both[:m], both[m:]
        mean = torch.where(n > 0, s / n.clamp_min(1.0), torch.full_like(s, float("nan")))
        self.history = (self.history + [mean.tolist()])[-2:]
        self.lam = self.weights_from_history(self.history, self.options.temperature)
        self._reset()
        return {"loss_weight": self.per_modality(self.lam.tolist()),
                "epoch_sep": self.per_modality([v if math.isfinite(v) else 0.0 for v in mean.tolist()])}

    def state_dict(self) -> dict:
        return {"history": [list(map(float, h)) for h in self.history], "lam": self.lam.tolist(),
                "loss_sum": self.loss_sum.tolist(), "count": self.count.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["lam"]) != self.num_modalities:
            raise ConfigError(f"dwa state has {len(state['lam'])} modalities, this run has {self.num_modalities}")
        self.history = [list(map(float, h)) for h in state["history"]]
        self.lam = torch.tensor(state["lam"], dtype=torch.float32)
        self.loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64)
        self.count = torch.tensor(state["count"], dtype=torch.float64)


# ---------------------------------------------------------------- uncertainty weighting

@register_objective("uncertainty")
class UncertaintyObjective(WeightedSepObjective):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018), closed-form variant.

    Mechanism: Kendall et al. minimise sum_m exp(-s_m) L_m + s_m jointly over the network and
    the log-variances s_m = log sigma_m^2; a task with a larger (noisier, more uncertain) loss
    gets a larger sigma and hence a SMALLER weight exp(-s_m).

    Adaptation (closed form instead of learnt s_m): for a given loss the optimum over s_m is
    s_m* = log L_m, so s_m tracks log of an exponential moving average of the modality's loss
    (mean over the samples that have it, sums and counts all-reduced across ranks), and the
    weight is lambda_m = exp(-s_m) = 1 / EMA(L_m), clamped to [min_weight, max_weight]. This
    needs no extra learnable parameters (the trainer's optimiser only sees model.parameters()),
    keeps every DDP rank identical, and is checkpointed as plain floats. The weight used at a
    step comes from the EMA before that step's loss is added (the weight is a constant for
    the backward pass, as in Kendall et al. where s_m is a separate variable).
    Options: momentum (EMA, 0.9), min_weight (0.1), max_weight (10.0).
    """

    options_type = UncertaintyOptions
    stats = {**WeightedSepObjective.stats, "log_var": StatInfo("log-variance s = log EMA(sep loss)")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = torch.full((self.num_modalities,), float("nan"), dtype=torch.float64)

    def log_var(self) -> Tensor:
        """s_m = log EMA(L_m); 0 (weight 1) before a modality was seen."""
        s = torch.where(torch.isfinite(self.ema), self.ema.clamp_min(1e-12).log(), torch.zeros_like(self.ema))
        return s.float()

    def current_weights(self) -> Tensor:
        lo, hi = math.log(1 / self.options.max_weight), math.log(1 / self.options.min_weight)
        return torch.exp(-self.log_var().clamp(lo, hi))

    def sep_weights(self, terms: SegTerms, epoch: int) -> Tensor:
        self.ema = to_device(self.ema, terms.sep_bm.device)  # the EMA lives on the step's device: no wait for it
        lam = self.current_weights()
        s, n = modality_sums(terms.sep_bm, terms.a, self.all_reduce)
        seen = n > 0
        batch_mean = s / n.clamp_min(1.0)
        first = seen & ~torch.isfinite(self.ema)
        upd = self.options.momentum * self.ema + (1 - self.options.momentum) * batch_mean
        self.ema = torch.where(first, batch_mean, torch.where(seen, upd, self.ema))
        return lam

    def extra_stats(self) -> dict[str, Tensor]:
        return {"log_var": self.log_var()}

    def state_dict(self) -> dict:
        return {"ema": self.ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ema"]) != self.num_modalities:
            raise ConfigError(f"uncertainty state has {len(state['ema'])} modalities, "
                              f"this run has {self.num_modalities}")
        self.ema = torch.tensor(state["ema"], dtype=torch.float64)
