"""The baseline objective: L = L_fuse + L_aux + sum_m L_sep[m] (METHOD.md section 4)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import losses as L
from .base import ObjectiveOutput, Objective, register_objective
from .terms import SEG_STATS, available_pairs, encode, fused_losses, sep_losses, stats_of


@register_objective("baseline")
class BaselineObjective(Objective):
    """L = L_fuse + L_aux + sum_m L_sep[m]; warm-up: sep only."""

    stats = SEG_STATS

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        image, target, mask, a, features = encode(model, batch, self.setting)
        b_idx, m_idx = available_pairs(features, a)
        fused = None if self.in_warmup(epoch) else model.fuse(features, mask)
        y = L.one_hot(target, model.num_classes if fused is None else fused.logits.shape[1])
        sep_bm = sep_losses(model, features, a, y, b_idx, m_idx)
        sep_m = sep_bm.sum(dim=0) / a.shape[0]
        if fused is None:
            l_fuse = l_aux = sep_m.new_zeros(())
            loss = sep_m.sum()
        else:
            l_fuse, l_aux = fused_losses(model, fused, y)
            loss = l_fuse + l_aux + sep_m.sum()
        stats = stats_of({"loss": loss, "fuse": l_fuse, "aux": l_aux}, {"sep": sep_m}, self.modality_names)
        return ObjectiveOutput(loss, stats)
