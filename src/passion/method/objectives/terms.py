"""The segmentation terms every objective builds on (METHOD.md section 4).

Encode once, fuse with the actual mask, single-modality segmentation losses of the available
(sample, modality) pairs, plus the per-modality reductions (all-reduced across DDP ranks) and
confidence ratios that the balancers share. Objectives compose these; none of them reaches
into another objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...models.interface import Features, FusedOutput, pair_rows, to_device
from ...utils import PassionError
from .. import losses as L
from ..preference import AllReduce
from .base import TRAINING_CURVES, Objective, PendingStats, StatInfo, Stats

# the stats of the baseline's loss, logged by every objective built on these terms
SEG_STATS = {
    "loss": StatInfo("total loss"),
    "fuse": StatInfo("fused loss L_fuse"),
    "aux": StatInfo("deep-supervision loss L_aux"),
    "sep": StatInfo("sep loss", TRAINING_CURVES),  # per modality: single-modality seg loss L_sep[m]
}


def check_model(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PassionError("pass the bare backbone to the objective and wrap ObjectiveModule(model, "
                           "objective) in DistributedDataParallel instead")


def availability(mask: Tensor, setting: str) -> Tensor:
    """a[b, m]: the mask in idt settings; all ones in pdt (complete data, only the teacher is masked)."""
    return torch.ones_like(mask) if setting == "pdt" else mask


def available_pairs(features: Features, a: Tensor) -> tuple[Tensor, Tensor]:
    """(b_idx, m_idx) of available (sample, modality) pairs in row-major order, on the features'
    device; read from the host copy of `a` (models.interface.host_mask), so no device sync."""
    return features.pairs(a)


def scatter_pairs(values: Tensor, b_idx: Tensor, m_idx: Tensor, shape: tuple[int, int]) -> Tensor:
    """[P] per-pair values -> [B, M] with exact zeros (and no gradient path) elsewhere."""
    out = values.new_zeros(shape)
    return out.index_put((b_idx, m_idx), values)


def unpack(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(image, long target on the image's device, bool mask where the batch keeps it: the trainer
    keeps it on the host, where the shape choices it makes cost no device sync)."""
    image = batch["image"]
    target = batch["target"].to(device=image.device, dtype=torch.long)
    mask = batch["mask"].to(dtype=torch.bool)
    return image, target, mask


def class_probs(logits: Tensor) -> Tensor:
    """Softmax over classes in at least float32 (logits may be half precision under autocast)."""
    return torch.softmax(L.at_least_fp32(logits), dim=1)


def loss_term(model: nn.Module, fn, *args):
    """fn(*args), a loss term on full-resolution maps. Under activation checkpointing ``all`` its
    intermediates (probabilities, logs, upsampled aux maps) are recomputed in the backward pass
    instead of kept, one term at a time: the same values and gradients."""
    if getattr(model, "activation_checkpointing", "off") != "all" or not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def term_runner(model: nn.Module):
    """The `run` argument of losses.aux_seg_loss / kl_with_aux: each term through `loss_term`."""
    return lambda fn, *args: loss_term(model, fn, *args)


def encode(model: nn.Module, batch: dict[str, Tensor], setting: str):
    """(image, target, mask, availability a, features): the one encoder pass of a step. mask and a
    stay where the batch keeps the mask (the host, in training); `on_device(a, image)` for sums."""
    check_model(model)
    image, target, mask = unpack(batch)
    a = availability(mask, setting)
    features = model.encode(image, a)
    return image, target, mask, a, features


def on_device(a: Tensor, like: Tensor) -> Tensor:
    """The availability a [B, M] as floats on `like`'s device, for the objectives' arithmetic."""
    return to_device(a, like.device, torch.float32)


def sep_losses(model: nn.Module, features: Features, a: Tensor, y: Tensor,
               b_idx: Tensor, m_idx: Tensor) -> Tensor:
    """[B, M] Seg(p_m, y) for available pairs, exact zeros elsewhere."""
    logits = model.decode_single(features, a)  # [B, M, C, *]
    vals = loss_term(model, _pair_seg_losses, logits, y, b_idx, m_idx)
    return scatter_pairs(vals, b_idx, m_idx, tuple(a.shape))


def _pair_seg_losses(logits: Tensor, y: Tensor, b_idx: Tensor, m_idx: Tensor) -> Tensor:
    """The pairs are gathered inside the term, so a recomputed term does not keep the gathered copy."""
    return _logit_seg_loss(pair_rows(logits, b_idx, m_idx), y.index_select(0, b_idx))


def fused_losses(model: nn.Module, fused: FusedOutput, y: Tensor) -> tuple[Tensor, Tensor]:
    """Batch means of L_fuse and L_aux."""
    l_fuse = loss_term(model, _logit_seg_loss, fused.logits, y).mean()
    l_aux = (L.aux_seg_loss(fused.aux_logits, y, run=term_runner(model)).mean() if fused.aux_logits
             else y.new_zeros(()))
    return l_fuse, l_aux


def _logit_seg_loss(logits: Tensor, y: Tensor) -> Tensor:
    return L.seg_loss(class_probs(logits), y)


# ---------------------------------------------------------------- the baseline's pieces, for balancers

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


def seg_terms(obj: Objective, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> SegTerms:
    """Encode once; fuse with the actual mask (not in warm-up); single-modality seg losses."""
    image, target, mask, a, features = encode(model, batch, obj.setting)
    b_idx, m_idx = available_pairs(features, a)
    warm = obj.in_warmup(epoch)
    fused = None if warm else model.fuse(features, mask)
    y = L.one_hot(target, model.num_classes if fused is None else fused.logits.shape[1])
    logits = model.decode_single(features, a)  # [B, M, C, *]
    probs = class_probs(pair_rows(logits, b_idx, m_idx))
    y_pairs = y.index_select(0, b_idx)
    sep_bm = scatter_pairs(loss_term(model, L.seg_loss, probs, y_pairs), b_idx, m_idx, tuple(a.shape))
    if fused is None:
        l_fuse = l_aux = sep_bm.new_zeros(())
    else:
        l_fuse, l_aux = fused_losses(model, fused, y)
    return SegTerms(l_fuse, l_aux, sep_bm, on_device(a, image), b_idx, m_idx, probs, y_pairs, target, features, warm)


def modality_sums(values_bm: Tensor, a: Tensor, all_reduce: AllReduce) -> tuple[Tensor, Tensor]:
    """All-reduced per-modality (sum over available samples, number of them): both [M] float64, on
    the device of values_bm."""
    both = torch.cat([(values_bm.detach().float() * a).sum(dim=0), a.sum(dim=0)]).double()
    both = all_reduce(both)
    m = values_bm.shape[1]
    return both[:m], both[m:]


def stats_of(scalars: dict[str, Tensor], per_mod: dict[str, Tensor], names: list[str]) -> PendingStats:
    """All logged values in one device tensor, read with one device->host copy when the trainer
    asks (base.PendingStats); per-modality maps keyed by modality name."""
    device = next(iter(scalars.values())).device  # host-side values (weights, state) are copied there
    flat = torch.cat([torch.stack([to_device(scalars[k].detach().float().reshape(()), device) for k in scalars])]
                     + [to_device(per_mod[k].detach().float().reshape(-1), device) for k in per_mod])

    def name(vals: list[float]) -> Stats:
        stats: Stats = {k: vals[i] for i, k in enumerate(scalars)}
        pos = len(scalars)
        for k in per_mod:
            stats[k] = {n: vals[pos + j] for j, n in enumerate(names)}
            pos += len(names)
        return stats

    return PendingStats(flat, name)


# ---------------------------------------------------------------- modality confidence (OGM-GE, PMR)

def class_balanced_true_prob(probs: Tensor, y: Tensor) -> Tensor:
    """[P]: mean over the classes present in a sample of the mean probability of that class on its voxels."""
    p, yy = probs.detach().float().flatten(2), y.float().flatten(2)
    n = yy.sum(dim=2)  # [P, C]
    per_class = (p * yy).sum(dim=2) / n.clamp_min(1.0)
    present = (n > 0).float()
    return (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)


def ratio_to_others(score: Tensor, seen: Tensor) -> Tensor:
    """rho_m = score_m / mean(score_k, k != m seen); 1 where m is unseen or has no seen partner.

    Tensor operations only (no per-modality branch), so it runs on the step's device without
    reading it."""
    score, seen = score.double(), seen.bool()
    counted = torch.where(seen, score, torch.zeros_like(score))
    partners = seen.sum() - seen.double()  # seen modalities other than m
    others_mean = (counted.sum() - counted) / partners.clamp_min(1.0)
    ratio = score / others_mean.clamp_min(1e-12)
    return torch.where(seen & (partners > 0), ratio, torch.ones_like(score))
