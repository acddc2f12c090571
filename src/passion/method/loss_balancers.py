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

This module also holds ``seg_terms``: the baseline's loss pieces (encode once, fuse with the
actual mask, single-modality probabilities of the available pairs) shared by every balancer,
so OGM-GE and PMR reuse exactly the baseline's losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from . import losses as L
from .objective import (ObjectiveOutput, Stats, _probs, _SegObjective, available_pairs, register_objective,
                        scatter_pairs)
from .preference import AllReduce


# ---------------------------------------------------------------- shared terms

@dataclass
class SegTerms:
    """The baseline's pieces of one step; probs/y_pairs are per available pair (b_idx, m_idx)."""

    l_fuse: Tensor
    l_aux: Tensor
    sep_bm: Tensor  # [B, M] Seg(p_m, y), zeros for unavailable pairs
    a: Tensor  # [B, M] float availability (all ones in pdt)
    b_idx: Tensor
    m_idx: Tensor
    probs: Tensor  # [P, C, *] single-modality probabilities of the available pairs
    y_pairs: Tensor  # [P, C, *] one-hot targets of those pairs
    target: Tensor  # [B, *] class map
    features: object  # passion.models.interface.Features
    warmup: bool

    @property
    def sep_m(self) -> Tensor:
        """[M] batch mean (over all B samples, like the baseline) of each modality's seg loss."""
        return self.sep_bm.sum(dim=0) / self.sep_bm.shape[0]


def seg_terms(obj: _SegObjective, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> SegTerms:
    """Encode once; fuse with the actual mask (not in warm-up); single-modality seg losses."""
    image, target, mask, a, features = obj._encode(model, batch)
    b_idx, m_idx = available_pairs(a)
    warm = obj.in_warmup(epoch)
    fused = None if warm else model.fuse(features, mask)
    y = L.one_hot(target, model.num_classes if fused is None else fused.logits.shape[1])
    logits = model.decode_single(features, a)  # [B, M, C, *]
    probs = _probs(logits[b_idx, m_idx])
    y_pairs = y.index_select(0, b_idx)
    sep_bm = scatter_pairs(L.seg_loss(probs, y_pairs), b_idx, m_idx, tuple(a.shape))
    if fused is None:
        l_fuse = l_aux = sep_bm.new_zeros(())
    else:
        l_fuse, l_aux = obj._fused(fused, y)
    return SegTerms(l_fuse, l_aux, sep_bm, a.float(), b_idx, m_idx, probs, y_pairs, target, features, warm)


def modality_sums(values_bm: Tensor, a: Tensor, all_reduce: AllReduce) -> tuple[Tensor, Tensor]:
    """All-reduced per-modality (sum over available samples, number of them): both [M] float64."""
    both = torch.cat([(values_bm.detach().float() * a).sum(dim=0), a.sum(dim=0)]).double()
    both = all_reduce(both)
    m = values_bm.shape[1]
    return both[:m].cpu(), both[m:].cpu()


def stats_of(scalars: dict[str, Tensor], per_mod: dict[str, Tensor], names: list[str]) -> Stats:
    """One device->host copy for all logged values; per-modality maps keyed by modality name."""
    keys = list(scalars) + list(per_mod)
    flat = torch.cat([torch.stack([scalars[k].detach().float().reshape(()) for k in scalars]).cpu()]
                     + [per_mod[k].detach().float().cpu().reshape(-1) for k in per_mod])
    vals = flat.tolist()
    stats: Stats = {k: vals[i] for i, k in enumerate(scalars)}
    pos = len(scalars)
    for k in keys[len(scalars):]:
        stats[k] = {n: vals[pos + j] for j, n in enumerate(names)}
        pos += len(names)
    return stats


def option(cfg, key: str, default, kind=float, check=None, what: str = ""):
    """objective.options[key] with a default, converted and validated with one-line errors."""
    opts = cfg.options or {}
    if not isinstance(opts, dict):
        raise ConfigError(f"objective.options must be a mapping, got {type(opts).__name__}")
    value = opts.get(key, default)
    if value is None:
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"objective.options.{key} must be {kind.__name__}, got {value!r}") from None
    if check is not None and not check(value):
        raise ConfigError(f"objective.options.{key} {what}, got {value!r}")
    return value


def check_options(cfg, known: set[str], name: str) -> None:
    unknown = sorted(set(cfg.options or {}) - known)
    if unknown:
        raise ConfigError(f"objective {name!r} has no option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")


class _WeightedSepObjective(_SegObjective):
    """L = L_fuse + L_aux + sum_m lambda[m] L_sep[m] with lambda from `sep_weights` (a [M] tensor)."""

    def sep_weights(self, terms: SegTerms, epoch: int) -> Tensor:
        return torch.ones(self.num_modalities)

    def extra_stats(self) -> dict[str, Tensor]:
        return {}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        terms = seg_terms(self, model, batch, epoch)
        lam = self.sep_weights(terms, epoch).to(terms.sep_bm.device, torch.float32)
        sep_m = terms.sep_m
        loss = terms.l_fuse + terms.l_aux + (lam * sep_m).sum()
        scalars = {"loss": loss, "fuse": terms.l_fuse, "aux": terms.l_aux}
        stats = stats_of(scalars, {"sep": sep_m, "loss_weight": lam, **self.extra_stats()}, self.modality_names)
        return ObjectiveOutput(loss, stats)


# ---------------------------------------------------------------- DWA

@register_objective("dwa")
class DWAObjective(_WeightedSepObjective):
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_options(self.cfg, {"temperature"}, "dwa")
        self.temperature = option(self.cfg, "temperature", 2.0, float, lambda v: v > 0, "must be > 0")
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
        self.loss_sum += (terms.sep_bm.detach().double() * terms.a.double()).sum(dim=0).cpu()
        self.count += terms.a.double().sum(dim=0).cpu()
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
        self.lam = self.weights_from_history(self.history, self.temperature)
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
class UncertaintyObjective(_WeightedSepObjective):
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_options(self.cfg, {"momentum", "min_weight", "max_weight"}, "uncertainty")
        self.momentum = option(self.cfg, "momentum", 0.9, float, lambda v: 0 <= v < 1, "must be in [0, 1)")
        self.min_weight = option(self.cfg, "min_weight", 0.1, float, lambda v: v > 0, "must be > 0")
        self.max_weight = option(self.cfg, "max_weight", 10.0, float, lambda v: v >= self.min_weight,
                                 "must be >= min_weight")
        self.ema = torch.full((self.num_modalities,), float("nan"), dtype=torch.float64)

    def log_var(self) -> Tensor:
        """s_m = log EMA(L_m); 0 (weight 1) before a modality was seen."""
        s = torch.where(torch.isfinite(self.ema), self.ema.clamp_min(1e-12).log(), torch.zeros_like(self.ema))
        return s.float()

    def current_weights(self) -> Tensor:
        lo, hi = math.log(1 / self.max_weight), math.log(1 / self.min_weight)
        return torch.exp(-self.log_var().clamp(lo, hi))

    def sep_weights(self, terms: SegTerms, epoch: int) -> Tensor:
        lam = self.current_weights()
        s, n = modality_sums(terms.sep_bm, terms.a, self.all_reduce)
        seen = n > 0
        batch_mean = s / n.clamp_min(1.0)
        first = seen & ~torch.isfinite(self.ema)
        upd = self.momentum * self.ema + (1 - self.momentum) * batch_mean
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
