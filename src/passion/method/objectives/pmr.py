"""PMR: Prototypical Modal Rebalance.

Fan, Xu, Wang, Zhang, Wang, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023 (reference code: fanyunfeng-bit/Modal-Imbalance-PMR).

Mechanism: every modality keeps one prototype per class (the class centroid of its unimodal
features). A feature's prototype logits are its negative Euclidean distances to the class
prototypes; the prototypical cross-entropy (PCE) of those logits against the label gives a
modality a gradient that does not depend on the fused head, so it can learn at its own pace.
The prototype scores s_m (mean softmax probability of the true class under the prototype
logits) decide which modality is weaker: with rho_m the score ratio, the weaker modality
(rho_m < 1) gets its PCE added with a weight that grows with the imbalance, the dominant one
gets weight 0. The loss is the baseline loss plus sum_m weight_m * PCE_m.

What had to be adapted for segmentation with per-modality encoders and missing modalities:
- features and labels are voxels: PCE and the score are computed per voxel on modality m's
  encoder features at scale ``feature_scale`` (default 0, the finest, full resolution, so even
  small regions keep voxels; the label map is resized by nearest neighbour for coarser scales),
  and both are class-balanced (mean over the classes present in the patch of the mean over
  their voxels), otherwise background alone would decide the score;
- prototypes: [M, C, F] class centroids of each modality's features, maintained as an
  exponential moving average of batch centroids (P <- (1 - momentum) P + momentum P_batch,
  momentum 0.2 as the reference's momentum_coef) instead of a separate pass over the training
  set per epoch (a full extra forward pass over 3D volumes); the centroid sums and voxel counts
  are all-reduced over DDP ranks, so every rank holds the same prototypes; the prototypes used
  in a step are the ones from before the step (a class seen for the first time is initialised
  from the batch), detached;
- missing modalities: only available (b, m) pairs contribute to prototypes, scores and PCE;
  a modality's prototype of a class is only updated when that class occurs with the modality;
- more than two modalities: rho_m = s_m / mean of s_k over the other modalities seen in the
  (global) batch (sums and counts all-reduced); weight_m = alpha * min(1, 1/rho_m - 1) for
  rho_m < 1 and 0 otherwise ("ratio"; the paper's ratio-driven coefficient, clipped so a
  near-zero score cannot blow the weight up), or alpha for every rho_m < 1 ("constant", as in
  the released code);
- the prototypical entropy regulariser of the paper (on the dominant modality, early epochs)
  is not part of the released code and is not implemented.
Options (reference defaults): alpha 1.0, momentum 0.2, feature_scale 0, weighting "ratio",
modulation_starts 0, modulation_ends null (never stop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...models.interface import to_device
from .. import losses as L
from .base import ModulationWindow, ObjectiveOutput, Objective, StatInfo, register_objective
from .terms import (SEG_STATS, SegTerms, class_balanced_true_prob, modality_sums, ratio_to_others, scatter_pairs,
                    seg_terms, stats_of)

DIST_EPS = 1e-6  # inside the sqrt: finite gradient at zero distance


def prototype_logits(features: Tensor, protos: Tensor, valid: Tensor) -> Tensor:
    """[P, C, V]: -||f(v) - P_c|| for features [P, F, V] and per-pair prototypes [P, C, F];
    classes without a prototype (valid [P, C] False) get a very negative logit."""
    f = features.float()
    d2 = (f.pow(2).sum(dim=1, keepdim=True)  # [P, 1, V]
          - 2.0 * torch.bmm(protos, f)  # [P, C, V]
          + protos.pow(2).sum(dim=2, keepdim=True))  # [P, C, 1]
    logits = -torch.sqrt(d2.clamp_min(0.0) + DIST_EPS)
    return logits.masked_fill(~valid[:, :, None], -1e4)


def class_balanced_ce(logits: Tensor, y: Tensor) -> Tensor:
    """[P]: mean over present classes of the mean -log softmax(true class) over their voxels."""
    logp = F.log_softmax(logits, dim=1)
    n = y.sum(dim=2)  # [P, C]
    per_class = -(logp * y).sum(dim=2) / n.clamp_min(1.0)
    present = (n > 0).float()
    return (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)


def pmr_weights(ratio: Tensor, alpha: float, weighting: str = "ratio") -> Tensor:
    """Weight of each modality's PCE: >0 for the weaker (rho < 1), 0 for the dominant."""
    weak = ratio < 1
    if weighting == "constant":
        w = torch.full_like(ratio, alpha)
    else:
        w = alpha * (1.0 / ratio.clamp_min(1e-12) - 1.0).clamp(0.0, 1.0)
    return torch.where(weak, w, torch.zeros_like(w)).float()


@dataclass
class PMROptions(ModulationWindow):
    alpha: float = 1.0
    momentum: float = 0.2  # of the prototype EMA (the reference's momentum_coef)
    feature_scale: int = 0  # encoder scale of the prototype features (0: the finest)
    weighting: str = "ratio"  # ratio | constant

    def rules(self):
        yield "alpha", self.alpha > 0, "must be > 0"
        yield "momentum", 0 < self.momentum <= 1, "must be in (0, 1]"
        yield "feature_scale", self.feature_scale >= 0, "must be >= 0"
        yield "weighting", self.weighting in ("ratio", "constant"), "must be ratio or constant"
        yield from super().rules()


@register_objective("pmr")
class PMRObjective(Objective):
    """Baseline loss + prototypical cross-entropy on the weaker modalities (see module doc)."""

    options_type = PMROptions
    stats = {**SEG_STATS,
             "pce_total": StatInfo("weighted prototypical cross-entropy"),
             "pce": StatInfo("prototypical cross-entropy"),
             "proto_score": StatInfo("prototype true-class probability"),
             "ratio": StatInfo("confidence ratio ρ to the other modalities"),
             "pmr_weight": StatInfo("weight of the prototypical cross-entropy")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.protos: Tensor | None = None  # [M, C, F] float32, on the training device
        self.seen: Tensor | None = None  # [M, C] bool

    def _features(self, terms: SegTerms) -> tuple[Tensor, Tensor]:
        scales = terms.features.scales
        if self.options.feature_scale >= len(scales):
            raise ConfigError(f"objective.options.feature_scale {self.options.feature_scale} but the backbone has "
                             f"{len(scales)} encoder scales")
        feats = scales[self.options.feature_scale][terms.b_idx, terms.m_idx]  # [P, F, *]
        tgt = L.target_at(terms.target, feats.shape[2:]).index_select(0, terms.b_idx)
        y = L.one_hot(tgt, terms.y_pairs.shape[1])
        return feats.float().flatten(2), y.flatten(2)

    def _batch_centroids(self, f: Tensor, y: Tensor, m_idx: Tensor) -> tuple[Tensor, Tensor]:
        """All-reduced [M, C, F] centroid sums and [M, C] voxel counts of this batch."""
        sums_p = torch.bmm(y, f.detach().transpose(1, 2))  # [P, C, F]
        counts_p = y.sum(dim=2)  # [P, C]
        m, c, nf = self.num_modalities, y.shape[1], f.shape[1]
        sums = sums_p.new_zeros(m, c, nf).index_add_(0, m_idx, sums_p)
        counts = counts_p.new_zeros(m, c).index_add_(0, m_idx, counts_p)
        both = self.all_reduce(torch.cat([sums.flatten(), counts.flatten()]).double())
        return both[: m * c * nf].reshape(m, c, nf).float(), both[m * c * nf:].reshape(m, c).float()

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        terms = seg_terms(self, model, batch, epoch)
        sep_m = terms.sep_m
        f, y = self._features(terms)
        sums, counts = self._batch_centroids(f, y, terms.m_idx)
        has = counts > 0
        batch_means = sums / counts.clamp_min(1.0)[:, :, None]
        if self.protos is None or self.protos.shape != batch_means.shape:
            self.protos = torch.zeros_like(batch_means)
            self.seen = torch.zeros_like(has)
        # the prototypes live on the step's device: a step never waits to read them
        self.protos, self.seen = to_device(self.protos, batch_means.device), to_device(self.seen, has.device)
        first = has & ~self.seen
        self.protos = torch.where(first[:, :, None], batch_means, self.protos)
        self.seen = self.seen | has
        protos_used = self.protos.clone()

        dev = f.device
        pair_protos = protos_used.index_select(0, terms.m_idx)  # [P, C, F]
        valid = self.seen.index_select(0, terms.m_idx)
        logits = prototype_logits(f, pair_protos, valid)
        ce = class_balanced_ce(logits, y)  # [P]
        score = class_balanced_true_prob(torch.softmax(logits.detach(), dim=1), y)
        shape = tuple(terms.a.shape)
        ce_m = scatter_pairs(ce, terms.b_idx, terms.m_idx, shape).sum(dim=0) / shape[0]
        s, n = modality_sums(scatter_pairs(score, terms.b_idx, terms.m_idx, shape), terms.a, self.all_reduce)
        seen_m = n > 0
        score_m = torch.where(seen_m, s / n.clamp_min(1.0), torch.zeros_like(s))
        ratio = ratio_to_others(score_m, seen_m)
        weight = pmr_weights(ratio, self.options.alpha, self.options.weighting) if self.options.modulating(epoch) \
            else torch.zeros(self.num_modalities, device=dev)

        # EMA update after the prototypes of this step were used
        upd = has & ~first
        ema = (1 - self.options.momentum) * self.protos + self.options.momentum * batch_means
        self.protos = torch.where(upd[:, :, None], ema, self.protos)

        l_pce = (weight * ce_m).sum()
        loss = terms.l_fuse + terms.l_aux + sep_m.sum() + l_pce
        scalars = {"loss": loss, "fuse": terms.l_fuse, "aux": terms.l_aux, "pce_total": l_pce}
        per_mod = {"sep": sep_m, "pce": ce_m, "proto_score": score_m.float(), "ratio": ratio.float(),
                   "pmr_weight": weight}
        return ObjectiveOutput(loss, stats_of(scalars, per_mod, self.modality_names))

    def state_dict(self) -> dict:
        if self.protos is None:
            return {"protos": None, "seen": None}
        return {"protos": self.protos.cpu().clone(), "seen": self.seen.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        protos, seen = state.get("protos"), state.get("seen")
        if protos is None:
            self.protos = self.seen = None
            return
        protos = torch.as_tensor(protos, dtype=torch.float32)
        if protos.shape[0] != self.num_modalities:
            raise ConfigError(f"pmr state has prototypes for {protos.shape[0]} modalities, "
                             f"this run has {self.num_modalities}")
        self.protos = protos.cpu()
        self.seen = torch.as_tensor(seen, dtype=torch.bool).cpu()
