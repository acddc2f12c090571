"""Per-sample losses of METHOD.md sections 4 and 5.

Every loss returns one value per sample ([B]) so that objectives can weight samples by
their modality availability. Inputs may come from autocast regions; everything is computed
in fp32 because clamps at 0.005 and eps 1e-7 are meaningless in half precision.
Targets are integer class maps [B, *spatial]; they are turned into one-hot maps here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.resize import linear_resize

PROB_CLAMP = 0.005
DICE_EPS = 1e-7
COSINE_EPS = 1e-5  # as in the reference implementation's prototype maps


def one_hot(target: Tensor, num_classes: int) -> Tensor:
    """[B, *spatial] int -> [B, C, *spatial] float32."""
    y = F.one_hot(target.long(), num_classes)  # [B, *spatial, C]
    return y.movedim(-1, 1).float()


def at_least_fp32(x: Tensor) -> Tensor:
    """Losses run in fp32 under bf16/fp16 autocast, and stay in float64 for float64 checks."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _spatial_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def weighted_ce(probs: Tensor, y: Tensor) -> Tensor:
    """Class-weighted CE; w_c = 1 - share of class c in this sample, so rare classes count more."""
    probs = at_least_fp32(probs)
    y = y.to(probs.dtype)
    dims = _spatial_dims(y)
    n_vox = float(math.prod(y.shape[2:]))
    w = 1.0 - y.sum(dim=dims) / n_vox  # [B, C]
    w = w.reshape(w.shape + (1,) * len(dims))
    ce = -(w * y * torch.log(probs.clamp(PROB_CLAMP, 1.0))).sum(dim=1)  # [B, *spatial]
    return ce.flatten(1).mean(dim=1)


def soft_dice(probs: Tensor, y: Tensor, eps: float = DICE_EPS) -> Tensor:
    """1 - mean over classes of the soft Dice coefficient, per sample."""
    probs = at_least_fp32(probs)
    y = y.to(probs.dtype)
    dims = _spatial_dims(y)
    inter = (probs * y).sum(dim=dims)
    denom = probs.sum(dim=dims) + y.sum(dim=dims) + eps
    return 1.0 - (2.0 * inter / denom).mean(dim=1)


def seg_loss(probs: Tensor, y: Tensor) -> Tensor:
    """Seg = WCE + Dice on probabilities (not logits)."""
    return weighted_ce(probs, y) + soft_dice(probs, y)


def call(fn, *args):
    """The default `run` of the multi-term losses below: fn(*args). An objective may pass one that
    checkpoints each term instead (objectives/terms.loss_term)."""
    return fn(*args)


def aux_weights(num_aux: int) -> list[float]:
    """2^-s for s = 1..S: the finest auxiliary map weighs 1/2."""
    return [2.0 ** -(s + 1) for s in range(num_aux)]


def _aux_term(z: Tensor, y: Tensor) -> Tensor:
    return seg_loss(linear_resize(torch.softmax(at_least_fp32(z), dim=1), y.shape[2:]), y)


def aux_seg_loss(aux_logits: Sequence[Tensor], y: Tensor, run=call) -> Tensor:
    """sum_s 2^-s Seg(up(softmax(z^s)), y); softmax first, then upsample to the target size.
    run(fn, *args) computes each term (see `call`)."""
    total = y.new_zeros(y.shape[0])
    for w, z in zip(aux_weights(len(aux_logits)), aux_logits):
        total = total + w * run(_aux_term, z, y)
    return total


def tempered_probs(logits: Tensor, temperature: float, size: Sequence[int] | None = None) -> Tensor:
    """clamp(up(softmax(z / T)), 0.005, 1): softmax, optional upsampling, then the clamp."""
    p = torch.softmax(at_least_fp32(logits) / temperature, dim=1)
    if size is not None:
        p = linear_resize(p, size)
    return p.clamp(PROB_CLAMP, 1.0)


def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def tempered_kl(student: Tensor, teacher: Tensor, temperature: float,
                size: Sequence[int] | None = None, rows: Tensor | None = None) -> Tensor:
    """KL_T(u, v) = T^2 * mean_{c,voxels} q_v (log q_v - log q_u), per sample; teacher v is used as given.

    rows: optional [P] teacher row of every student row, so that a teacher shared by several
    students (PASSION: one fused output, one student per available modality) is computed once.
    """
    q_u = tempered_probs(student, temperature, size)
    q_v = tempered_probs(teacher, temperature, size)
    log_q_v = torch.log(q_v)
    kl = _rows(q_v, rows) * (_rows(log_q_v, rows) - torch.log(q_u))
    return temperature ** 2 * kl.flatten(1).mean(dim=1)


def kl_with_aux(student: Tensor, teacher: Tensor, student_aux: Sequence[Tensor],
                teacher_aux: Sequence[Tensor], temperature: float, rows: Tensor | None = None,
                run=call) -> Tensor:
    """KL_T(z_m, z) + sum_s 2^-s KL_T(z_m^s, z^s), aux maps upsampled to the main logits' size.

    rows: as in `tempered_kl` (teacher row of each student row; None: row p of both).
    run(fn, *args) computes each term (see `call`).
    """
    size = student.shape[2:]
    total = run(tempered_kl, student, teacher, temperature, None, rows)
    for w, zs, zt in zip(aux_weights(len(student_aux)), student_aux, teacher_aux):
        total = total + w * run(tempered_kl, zs, zt, temperature, size, rows)
    return total


def target_at(target: Tensor, size: Sequence[int]) -> Tensor:
    """Class map resized (nearest) to `size`; decoder features coarser than the target need this."""
    if tuple(target.shape[1:]) == tuple(size):
        return target
    t = F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")
    return t[:, 0].long()


def class_missing_counts(y: Tensor) -> Tensor:
    """[C]: number of samples in which each class is absent (0 means present in every sample).

    Returned as a sum over samples so that DDP ranks can all-reduce it exactly.
    """
    present = y.flatten(2).sum(dim=2) > 0  # [B, C]
    return (~present).sum(dim=0).float()


def prototypes(features: Tensor, y: Tensor) -> Tensor:
    """[B, K, F]: mean feature over the voxels of each selected class, per sample."""
    f = at_least_fp32(features).flatten(2)  # [B, F, V]
    yy = y.to(f.dtype).flatten(2)  # [B, K, V]
    counts = yy.sum(dim=2, keepdim=True)  # [B, K, 1]
    return torch.bmm(yy, f.transpose(1, 2)) / counts.clamp_min(1.0)


def similarity_maps(features: Tensor, protos: Tensor) -> Tensor:
    """[B, K, *spatial]: cosine similarity of every voxel's feature with each class prototype.

    Same formula as F.cosine_similarity (norms clamped at eps separately) but via one bmm,
    so no [B, K, F, voxels] tensor is materialised.
    """
    f = at_least_fp32(features)
    spatial = f.shape[2:]
    flat = f.flatten(2)  # [B, F, V]
    dot = torch.bmm(protos, flat)  # [B, K, V]
    # sqrt of the clamped sum of squares: the same as norm().clamp_min(eps), but Tensor.norm over the
    # channel axis of [B, F, V] runs 5x slower on the CPU; clamping before the sqrt keeps the
    # gradient of an all-zero feature at 0 (sqrt'(0) is infinite)
    f_norm = flat.square().sum(dim=1).clamp_min(COSINE_EPS ** 2).sqrt()  # [B, V]
    p_norm = protos.norm(dim=2).clamp_min(COSINE_EPS)  # [B, K]
    sim = dot / f_norm[:, None, :] / p_norm[:, :, None]
    return sim.reshape(sim.shape[:2] + spatial)


def proto_distill(student_feat: Tensor, teacher_feat: Tensor, y: Tensor,
                  classes: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Semantic self-distillation: per-sample MSE and mean-abs distance of similarity maps.

    y: one-hot [B, C, *spatial] at the features' resolution, one row per teacher row; classes:
    bool [C] selecting the classes present in every sample of the (global) batch. Prototypes
    are computed separately from student and teacher features. rows: optional [P] teacher row
    of every student row (the teacher's maps are then computed once per sample). With no
    selected class both terms are zero.

    The maps are computed for every class and the unselected ones weighted 0, rather than
    indexing the selected classes: which classes are present is only known on the device, and
    indexing by it would make a GPU step wait for the device here. An absent class has a zero
    prototype and a zero map, so nothing undefined enters the sums.
    """
    s_student = similarity_maps(student_feat, prototypes(student_feat, _rows(y, rows)))
    s_teacher = similarity_maps(teacher_feat, prototypes(teacher_feat, y))
    diff = s_student - _rows(s_teacher, rows)  # [P, C, *spatial]
    weight = classes.to(diff.dtype).reshape((1, -1) + (1,) * (diff.dim() - 2))
    count = classes.sum().clamp_min(1) * math.prod(diff.shape[2:])  # selected classes x voxels
    diff = (diff * weight).flatten(1)
    return diff.pow(2).sum(dim=1) / count, diff.abs().sum(dim=1) / count
