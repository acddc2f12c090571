"""PASSION (METHOD.md section 5): self-distillation, preference gate, availability weights, beta."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ObjectiveConfig
from ...models.interface import FusedOutput, to_device
from .. import losses as L
from ..preference import PreferenceState, preference_gate, relative_preference_sums
from .base import (TRAINING_CURVES, FigureInfo, ObjectiveOutput, Objective, Options, PendingStats, StatInfo, Stats,
                   option_names, parse_options, register_objective)
from .terms import (SEG_STATS, available_pairs, encode, fused_losses, loss_term, on_device, scatter_pairs,
                    sep_losses, stats_of, term_runner)


@dataclass
class PassionOptions(Options):
    """PASSION's hyper-parameters (METHOD.md section 5).

    They are the top-level keys of the ``objective:`` config section (``objective.kl_weight``,
    not ``objective.options.kl_weight``), as in the paper presets and every saved run config;
    their defaults are ObjectiveConfig's. This class types and checks them like any options.
    """

    temperature: float  # T of the tempered KL distillation
    kl_weight: float
    proto_weight: float
    eta: float  # beta's step size, grown by eta_growth every eta_growth_every epochs (0: never)
    eta_growth: float
    eta_growth_every: int
    beta_min: float
    beta_max: float

    def rules(self):
        yield "temperature", self.temperature > 0, "must be > 0"
        yield "kl_weight", self.kl_weight >= 0, "must be >= 0"
        yield "proto_weight", self.proto_weight >= 0, "must be >= 0"
        yield "eta", self.eta >= 0, "must be >= 0"
        yield "eta_growth", self.eta_growth > 0, "must be > 0"
        yield "eta_growth_every", self.eta_growth_every >= 0, "must be >= 0 (0: never grow)"
        yield "beta_min", self.beta_min >= 0, "must be >= 0"
        yield "beta_max", self.beta_max >= self.beta_min, "must be >= beta_min"


@register_objective("passion")
class PassionObjective(Objective):
    """PASSION (METHOD.md section 5): self-distillation, preference gate, availability weights, beta."""

    options_type = PassionOptions
    stats = {
        **SEG_STATS,
        "sep_total": StatInfo("gated, weighted sep loss"),
        "kl_total": StatInfo("weighted distillation loss"),
        "proto_total": StatInfo("gated, weighted prototype loss"),
        "kl": StatInfo("kl loss", TRAINING_CURVES),
        "proto": StatInfo("proto loss", TRAINING_CURVES),
        "distance": StatInfo("prototype distance"),
        "gate": StatInfo("preference gate"),
        "beta": StatInfo("task-wise weight β", "preference"),
        "relative_preference": StatInfo("relative preference (epoch)", "preference", zero_line=True),
        "weight": StatInfo("availability weight"),
        "eta": StatInfo("β step size η"),
    }
    figures = {"preference": FigureInfo("PASSION: task-wise weights and relative preference per modality",
                                        "beta and relative preference")}

    @classmethod
    def read_options(cls, cfg: ObjectiveConfig) -> PassionOptions:
        """From the top-level keys; `objective.options` (other objectives' options) is ignored."""
        values = {key: getattr(cfg, key) for key in option_names(PassionOptions)}
        return parse_options(PassionOptions, values, cls.name, where="objective")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        self.state = PreferenceState(self.num_modalities, o.eta, o.eta_growth, o.eta_growth_every,
                                     o.beta_min, o.beta_max)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        image, target, mask, a, features = encode(model, batch, self.setting)
        b_idx, m_idx = available_pairs(features, a)
        shape = tuple(a.shape)
        dev = image.device
        beta = to_device(self.state.beta, dev)
        w = to_device(self.weights, dev)
        if self.in_warmup(epoch):
            return self._warmup_step(model, features, target, a, b_idx, m_idx, beta, w)

        # teacher (the actual mask) and students (one-hot masks), one batched pass where the backbone can
        fused, single = model.fuse_teacher_and_students(features, mask, b_idx, m_idx)
        y = L.one_hot(target, fused.logits.shape[1])
        l_fuse, l_aux = fused_losses(model, fused, y)
        sep_m = sep_losses(model, features, a, y, b_idx, m_idx).sum(dim=0) / shape[0]

        kl_bm = scatter_pairs(self._kl_pairs(model, fused, single, b_idx), b_idx, m_idx, shape)
        proto_vals, dist_vals = self._proto_pairs(model, fused, single, target, b_idx)
        proto_bm = scatter_pairs(proto_vals, b_idx, m_idx, shape)
        d_bm = scatter_pairs(dist_vals.detach(), b_idx, m_idx, shape)

        a_f = on_device(a, image)
        rp = self.all_reduce(relative_preference_sums(d_bm, a_f))
        gate = preference_gate(rp).float()
        self.state.accumulate(d_bm.sum(dim=0), a_f.sum(dim=0))

        kl_m = kl_bm.sum(dim=0) / shape[0]
        proto_m = proto_bm.sum(dim=0) / shape[0]
        o = self.options
        l_sep = (gate * beta * w * sep_m).sum()
        l_kl = (beta * w * kl_m).sum()
        l_proto = (gate * w * proto_m).sum()
        loss = l_fuse + l_aux + l_sep + o.kl_weight * l_kl + o.proto_weight * l_proto

        dist_m = d_bm.sum(dim=0) / a_f.sum(dim=0).clamp_min(1.0)
        return ObjectiveOutput(loss, self._stats([loss, l_fuse, l_aux, l_sep, l_kl, l_proto],
                                                 [sep_m, kl_m, proto_m, dist_m, gate, beta, rp, w]))

    def _warmup_step(self, model, features, target, a, b_idx, m_idx, beta, w) -> ObjectiveOutput:
        """RFNet-style warm-up: only sum_m beta w L_sep (no fusion, no distillation, no gate)."""
        y = L.one_hot(target, model.num_classes)
        sep_m = sep_losses(model, features, a, y, b_idx, m_idx).sum(dim=0) / a.shape[0]
        l_sep = (beta * w * sep_m).sum()
        zero = l_sep.new_zeros(())
        zeros = torch.zeros_like(sep_m)
        ones = torch.ones_like(sep_m)
        return ObjectiveOutput(l_sep, self._stats([l_sep, zero, zero, l_sep, zero, zero],
                                                  [sep_m, zeros, zeros, zeros, ones, beta, zeros, w]))

    def _kl_pairs(self, model: nn.Module, fused: FusedOutput, single: FusedOutput, b_idx: Tensor) -> Tensor:
        """[P] KL_T(z_m, z) + sum_s 2^-s KL_T(z_m^s, z^s) against the detached teacher."""
        teacher = fused.logits.detach()
        teacher_aux = [t.detach() for t in fused.aux_logits]
        return L.kl_with_aux(single.logits, teacher, single.aux_logits, teacher_aux, self.options.temperature,
                             rows=b_idx, run=term_runner(model))

    def _proto_pairs(self, model: nn.Module, fused: FusedOutput, single: FusedOutput, target: Tensor,
                     b_idx: Tensor) -> tuple[Tensor, Tensor]:
        """[P] proto MSE and distance on g^1; classes present in every sample of the global batch."""
        g_teacher = fused.decoder_features[0].detach()
        g_student = single.decoder_features[0]
        y_g = L.one_hot(L.target_at(target, g_teacher.shape[2:]), fused.logits.shape[1])
        missing = self.all_reduce(L.class_missing_counts(y_g))
        classes = missing == 0
        return loss_term(model, L.proto_distill, g_student, g_teacher, y_g, classes, b_idx)

    def _stats(self, scalars: list[Tensor], per_mod: list[Tensor]) -> PendingStats:
        names = ("loss", "fuse", "aux", "sep_total", "kl_total", "proto_total")
        keys = ("sep", "kl", "proto", "distance", "gate", "beta", "relative_preference", "weight")
        return stats_of(dict(zip(names, scalars)), dict(zip(keys, per_mod)), self.modality_names)

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
