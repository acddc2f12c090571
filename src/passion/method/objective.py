"""Training objectives behind one interface (METHOD.md sections 4 and 5).

An objective turns (model, batch, epoch) into a loss plus named statistics and owns any
state that outlives a step (PASSION's beta, eta and epoch distances). It talks to the model
only through the backbone contract (encode / fuse / decode_single), so it works with every
backbone. Objectives are registered by name; a new balancer is one class and a decorator.

Under DDP, call the objective inside the wrapped module's forward (see ObjectiveModule);
every statistic that decides the gate or beta goes through the injectable ``all_reduce``
(a sum across ranks), so all ranks hold identical gates and beta.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError, ObjectiveConfig
from ..models.interface import Features, FusedOutput
from ..utils import PassionError
from . import losses as L
from .preference import (AllReduce, PreferenceState, availability_weights, identity_all_reduce,
                         preference_gate, relative_preference_sums)

Stats = dict[str, Any]


@dataclass
class ObjectiveOutput:
    """loss: scalar to backpropagate; stats: JSON-ready floats and {modality name: float} maps."""

    loss: Tensor
    stats: Stats = field(default_factory=dict)


class Objective(abc.ABC):
    """Base of all objectives: holds the modality names, the setting and the all_reduce hook."""

    name: str = ""

    def __init__(self, cfg: ObjectiveConfig, num_modalities: int, modality_names: Sequence[str],
                 availability_counts: Sequence[int], iters_per_epoch: int, setting: str,
                 all_reduce: AllReduce | None = None):
        if len(modality_names) != num_modalities:
            raise ConfigError(f"objective: {len(modality_names)} modality names for {num_modalities} modalities")
        self.cfg = cfg
        self.num_modalities = num_modalities
        self.modality_names = list(modality_names)
        self.setting = setting
        self.weights = availability_weights(list(availability_counts), iters_per_epoch,
                                            self.modality_names, setting)
        self.all_reduce: AllReduce = all_reduce or identity_all_reduce

    @abc.abstractmethod
    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput: ...

    def start_epoch(self, epoch: int) -> None:
        """Hook before the first step of an epoch (no-op by default)."""

    def end_epoch(self, epoch: int) -> Stats:
        """Hook after the last step of an epoch; returns per-epoch statistics."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (nothing by default)."""

    def in_warmup(self, epoch: int) -> bool:
        return epoch < int(self.cfg.warmup_epochs)

    def per_modality(self, values: Sequence[float]) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.modality_names, values)}


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def list_objectives() -> list[str]:
    return sorted(_REGISTRY)


def build_objective(name: str, cfg: ObjectiveConfig, num_modalities: int, modality_names: Sequence[str],
                    availability_counts: Sequence[int], iters_per_epoch: int, setting: str,
                    all_reduce: AllReduce | None = None) -> Objective:
    """Build a registered objective; unknown names and absent modalities fail with one line."""
    if name not in _REGISTRY:
        raise ConfigError(f"objective.name must be one of {', '.join(list_objectives())}, got {name!r}")
    return _REGISTRY[name](cfg, num_modalities, modality_names, availability_counts,
                           iters_per_epoch, setting, all_reduce=all_reduce)


class ObjectiveModule(nn.Module):
    """Backbone + objective as one module, so DDP's forward wraps the whole loss computation.

    DDP only synchronises gradients correctly when the graph is built inside its forward;
    the objective calls encode/fuse/decode_single directly, so wrap this module instead.
    """

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        return self.objective(self.model, batch, epoch)


# ---------------------------------------------------------------- shared pieces

def _check_model(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PassionError("pass the bare backbone to the objective and wrap ObjectiveModule(model, "
                           "objective) in DistributedDataParallel instead")


def availability(mask: Tensor, setting: str) -> Tensor:
    """a[b, m]: the mask in idt settings; all ones in pdt (complete data, only the teacher is masked)."""
    return torch.ones_like(mask) if setting == "pdt" else mask


def available_pairs(a: Tensor) -> tuple[Tensor, Tensor]:
    """(b_idx, m_idx) of available (sample, modality) pairs in row-major order."""
    b_idx, m_idx = a.nonzero(as_tuple=True)
    return b_idx, m_idx


def scatter_pairs(values: Tensor, b_idx: Tensor, m_idx: Tensor, shape: tuple[int, int]) -> Tensor:
    """[P] per-pair values -> [B, M] with exact zeros (and no gradient path) elsewhere."""
    out = values.new_zeros(shape)
    return out.index_put((b_idx, m_idx), values)


def _unpack(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    image = batch["image"]
    target = batch["target"].to(device=image.device, dtype=torch.long)
    mask = batch["mask"].to(device=image.device, dtype=torch.bool)
    return image, target, mask


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=1)


class _SegObjective(Objective):
    """Steps shared by the baseline and PASSION: encode once, single-modality seg losses."""

    def _encode(self, model: nn.Module, batch: dict[str, Tensor]):
        _check_model(model)
        image, target, mask = _unpack(batch)
        a = availability(mask, self.setting)
        features = model.encode(image, a)
        return image, target, mask, a, features

    def _sep(self, model: nn.Module, features: Features, a: Tensor, y: Tensor,
             b_idx: Tensor, m_idx: Tensor) -> Tensor:
        """[B, M] Seg(p_m, y) for available pairs, exact zeros elsewhere."""
        logits = model.decode_single(features, a)  # [B, M, C, *]
        vals = L.seg_loss(_probs(logits[b_idx, m_idx]), y.index_select(0, b_idx))
        return scatter_pairs(vals, b_idx, m_idx, tuple(a.shape))

    def _fused(self, fused: FusedOutput, y: Tensor) -> tuple[Tensor, Tensor]:
        """Batch means of L_fuse and L_aux."""
        l_fuse = L.seg_loss(_probs(fused.logits), y).mean()
        l_aux = L.aux_seg_loss(fused.aux_logits, y).mean() if fused.aux_logits else y.new_zeros(())
        return l_fuse, l_aux


@register_objective("baseline")
class BaselineObjective(_SegObjective):
    """L = L_fuse + L_aux + sum_m L_sep[m] (METHOD.md section 4); warm-up: sep only."""

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        image, target, mask, a, features = self._encode(model, batch)
        b_idx, m_idx = available_pairs(a)
        fused = None if self.in_warmup(epoch) else model.fuse(features, mask)
        y = L.one_hot(target, model.num_classes if fused is None else fused.logits.shape[1])
        sep_bm = self._sep(model, features, a, y, b_idx, m_idx)
        sep_m = sep_bm.sum(dim=0) / a.shape[0]
        if fused is None:
            l_fuse = l_aux = sep_m.new_zeros(())
            loss = sep_m.sum()
        else:
            l_fuse, l_aux = self._fused(fused, y)
            loss = l_fuse + l_aux + sep_m.sum()
        vals = torch.cat([torch.stack([loss, l_fuse, l_aux]), sep_m]).detach().cpu().tolist()
        stats = {"loss": vals[0], "fuse": vals[1], "aux": vals[2], "sep": self.per_modality(vals[3:])}
        return ObjectiveOutput(loss, stats)


@register_objective("passion")
class PassionObjective(_SegObjective):
    """PASSION (METHOD.md section 5): self-distillation, preference gate, availability weights, beta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.cfg
        self.state = PreferenceState(self.num_modalities, c.eta, c.eta_growth, c.eta_growth_every,
                                     c.beta_min, c.beta_max)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        image, target, mask, a, features = self._encode(model, batch)
        b_idx, m_idx = available_pairs(a)
        shape = tuple(a.shape)
        dev = image.device
        beta = self.state.beta.to(dev)
        w = self.weights.to(dev)
        if self.in_warmup(epoch):
            return self._warmup_step(model, features, target, a, b_idx, m_idx, beta, w)

        # teacher (the actual mask) and students (one-hot masks), one batched pass where the backbone can
        fused, single = model.fuse_teacher_and_singles(features, mask, b_idx, m_idx)
        y = L.one_hot(target, fused.logits.shape[1])
        l_fuse, l_aux = self._fused(fused, y)
        sep_m = self._sep(model, features, a, y, b_idx, m_idx).sum(dim=0) / shape[0]

        kl_bm = scatter_pairs(self._kl_pairs(fused, single, b_idx), b_idx, m_idx, shape)
        proto_vals, dist_vals = self._proto_pairs(fused, single, target, b_idx)
        proto_bm = scatter_pairs(proto_vals, b_idx, m_idx, shape)
        d_bm = scatter_pairs(dist_vals.detach(), b_idx, m_idx, shape)

        rp = self.all_reduce(relative_preference_sums(d_bm, a.float()))
        gate = preference_gate(rp).float()
        self.state.accumulate(d_bm.sum(dim=0), a.float().sum(dim=0))

        kl_m = kl_bm.sum(dim=0) / shape[0]
        proto_m = proto_bm.sum(dim=0) / shape[0]
        c = self.cfg
        l_sep = (gate * beta * w * sep_m).sum()
        l_kl = (beta * w * kl_m).sum()
        l_proto = (gate * w * proto_m).sum()
        loss = l_fuse + l_aux + l_sep + c.kl_weight * l_kl + c.proto_weight * l_proto

        dist_m = d_bm.sum(dim=0) / a.float().sum(dim=0).clamp_min(1.0)
        scalars = torch.stack([loss, l_fuse, l_aux, l_sep, l_kl, l_proto])
        per_mod = torch.stack([sep_m, kl_m, proto_m, dist_m, gate, beta, rp.float(), w])
        return ObjectiveOutput(loss, self._stats(scalars, per_mod))

    def _warmup_step(self, model, features, target, a, b_idx, m_idx, beta, w) -> ObjectiveOutput:
        """RFNet-style warm-up: only sum_m beta w L_sep (no fusion, no distillation, no gate)."""
        y = L.one_hot(target, model.num_classes)
        sep_m = self._sep(model, features, a, y, b_idx, m_idx).sum(dim=0) / a.shape[0]
        l_sep = (beta * w * sep_m).sum()
        zero = l_sep.new_zeros(())
        zeros = torch.zeros_like(sep_m)
        ones = torch.ones_like(sep_m)
        scalars = torch.stack([l_sep, zero, zero, l_sep, zero, zero])
        per_mod = torch.stack([sep_m, zeros, zeros, zeros, ones, beta, zeros, w])
        return ObjectiveOutput(l_sep, self._stats(scalars, per_mod))

    def _kl_pairs(self, fused: FusedOutput, single: FusedOutput, b_idx: Tensor) -> Tensor:
        """[P] KL_T(z_m, z) + sum_s 2^-s KL_T(z_m^s, z^s) against the detached teacher."""
        teacher = fused.logits.detach()
        teacher_aux = [t.detach() for t in fused.aux_logits]
        return L.kl_with_aux(single.logits, teacher, single.aux_logits, teacher_aux, self.cfg.temperature,
                             rows=b_idx)

    def _proto_pairs(self, fused: FusedOutput, single: FusedOutput, target: Tensor,
                     b_idx: Tensor) -> tuple[Tensor, Tensor]:
        """[P] proto MSE and distance on g^1; classes present in every sample of the global batch."""
        g_teacher = fused.decoder_features[0].detach()
        g_student = single.decoder_features[0]
        y_g = L.one_hot(L.target_at(target, g_teacher.shape[2:]), fused.logits.shape[1])
        missing = self.all_reduce(L.class_missing_counts(y_g))
        classes = missing == 0
        return L.proto_distill(g_student, g_teacher, y_g, classes, rows=b_idx)

    def _stats(self, scalars: Tensor, per_mod: Tensor) -> Stats:
        s = scalars.detach().float().cpu().tolist()
        p = per_mod.detach().float().cpu().tolist()
        stats: Stats = dict(zip(("loss", "fuse", "aux", "sep_total", "kl_total", "proto_total"), s))
        keys = ("sep", "kl", "proto", "distance", "gate", "beta", "relative_preference", "weight")
        stats.update({k: self.per_modality(v) for k, v in zip(keys, p)})
        return stats

    def end_epoch(self, epoch: int) -> Stats:
        """All-reduce the epoch distances, update beta (not during warm-up); keyed by modality."""
        out = self.state.end_epoch(epoch, self.all_reduce, update=not self.in_warmup(epoch))
        return {"beta": self.per_modality(out["beta"]),
                "relative_preference": self.per_modality(out["relative_preference"]),
                "distance": self.per_modality(out["distance"]),
                "eta": out["eta"]}

    def state_dict(self) -> dict:
        return {"preference": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state["preference"])


def flatten_stats(stats: Stats, sep: str = "/") -> dict[str, float]:
    """{"sep": {"flair": x}} -> {"sep/flair": x}: for TensorBoard-like scalar sinks."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update({f"{key}{sep}{k}": float(v) for k, v in value.items()})
        else:
            flat[key] = float(value)
    return flat
