"""The one backbone contract (METHOD.md section 3).

Every backbone takes images [B, M, *spatial] and a per-sample availability mask [B, M]
(bool) and exposes three stages, so that objectives, evaluators and exporters work with
every backbone without adapters:

- ``encode(x, mask) -> Features``: per-modality multi-scale features. Inputs and features of
  unavailable modalities are zero. ``Features.scales[l]`` has shape [B, M, C_l, *spatial_l],
  finest scale first. Backbones may stash extra per-modality tensors in ``Features.extra``
  (same leading [B, M] layout) when their fusion needs them.
- ``fuse(features, mask) -> FusedOutput``: the fusion decoder. ``mask`` may differ per sample,
  and may differ from the mask given to ``encode`` (PASSION re-runs the fusion with one-hot
  masks on the same features); fuse must itself zero the features of modalities that are off
  in *its* mask.
- ``fuse_single(features, b_idx, m_idx) -> FusedOutput``: the fusion decoder with only one
  modality present, for P (sample, modality) pairs at once; row p is sample b_idx[p] under the
  one-hot mask of m_idx[p]. One batched pass, equal to ``fuse`` with one-hot masks (the default
  does exactly that); backbones override it where a one-hot mask allows a cheaper exact path.
- ``fuse_teacher_and_singles(features, mask, b_idx, m_idx)``: ``fuse`` and ``fuse_single``
  together, one batched decoder pass where the backbone allows it.
- ``fuse_teacher_and_students(features, mask, b_idx, m_idx)``: the same for PASSION, where a
  student that would recompute its sample's teacher row reuses it (shared, not overridden).
- ``decode_single(features, mask=None) -> logits [B, M, C, *spatial]``: the shared
  single-modality decoder applied to each modality's features. Entries whose mask is False
  may be skipped (returned as zeros). ``decode_available`` implements it for a decoder over
  (sample, modality) pairs; ``Features.pair_scales`` gathers those pairs' features once, so the
  one-modality fusion rows and this decoder share one copy.
- ``forward(x, mask) -> logits [B, C, *spatial]`` for inference.
- ``modality_parameters(m)``: the parameters of modality m's encoder.
- Masks may live on the host or on the device. Every choice a mask makes about shapes (which
  encoders run on which samples, which pairs exist) is read from its host copy (``host_mask``,
  ``modality_samples``, ``Features.pairs``) and only arithmetic moves it to the device, so a
  training step, whose mask the trainer keeps on the host, never waits for a GPU
  (tests/test_no_device_wait.py).
- Training options: ``set_activation_checkpointing(mode)`` (a backbone declares its
  ``checkpoint_blocks``, the ``per_row_blocks`` among them, and ``encoder_modules``) and
  ``compile_stages()``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def host_mask(mask: Tensor) -> Tensor:
    """The [B, M] availability mask on the host, as bool, for the shape decisions (see the module
    doc). Free for a host mask; a mask on a GPU is copied, and waited for, at every call."""
    return mask.detach().to(device="cpu", dtype=torch.bool)


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A small host tensor (mask, indices, weights) on `device` without waiting for the device.

    A blocking host->GPU copy waits for every kernel queued before it, and CUDA may do the same
    for a ``non_blocking`` copy from ordinary (pageable) memory; from page-locked memory the
    copy simply joins the queue, so a host tensor bound for a CUDA device is pinned first (a
    host-side copy; PyTorch keeps the pinned block until the transfer is done). On the host, or
    already on `device`, nothing is copied."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def modality_samples(mask: Tensor, device: torch.device) -> list[Tensor | None]:
    """Per modality m of mask [B, M]: None when every sample has it, else the indices of the
    samples that do, on `device` (empty when none), read from the host copy of the mask."""
    host = host_mask(mask)
    return [None if bool(sel.all()) else to_device(sel.nonzero().squeeze(1), device)
            for sel in host.unbind(dim=1)]


@dataclass
class _PairSet:
    """One list of (sample, modality) pairs: its indices on the features' device, their host
    copies, and, once ``Features.pair_scales`` gathered them, the pairs' features."""

    b: Tensor
    m: Tensor
    b_host: Tensor
    m_host: Tensor
    rows: list[Tensor] | None = None

    def holds(self, b_host: Tensor, m_host: Tensor) -> bool:
        return (self.b_host.shape == b_host.shape and torch.equal(self.b_host, b_host)
                and torch.equal(self.m_host, m_host))


@dataclass
class Features:
    """Per-modality encoder features: each tensor is [B, M, ...]."""

    scales: list[Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)
    _pair_sets: list[_PairSet] = field(default_factory=list, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.scales[0].shape[0]

    def map(self, fn) -> "Features":
        return Features([fn(t) for t in self.scales], {k: fn(v) for k, v in self.extra.items()})

    def repeat_each(self, times: int) -> "Features":
        """Repeat every sample `times` times consecutively ([B, ...] -> [B*times, ...])."""
        return self.map(lambda t: t.repeat_interleave(times, dim=0))

    def pairs(self, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(b_idx, m_idx) of the (sample, modality) pairs where mask [B, M] (default: all) is True,
        in row-major order, on the features' device. Read from the host copy of the mask, and the
        same tensors for the same mask, so that ``pair_scales`` recognises them without asking the
        device."""
        batch, mods = self.scales[0].shape[:2]
        host = torch.ones(batch, mods, dtype=torch.bool) if mask is None else host_mask(mask)
        pair_set = self._pair_set_of_host(*host.nonzero(as_tuple=True))
        return pair_set.b, pair_set.m

    def _pair_set_of_host(self, b_host: Tensor, m_host: Tensor) -> _PairSet:
        for pair_set in self._pair_sets:
            if pair_set.holds(b_host, m_host):
                return pair_set
        device = self.scales[0].device
        pair_set = _PairSet(to_device(b_host, device), to_device(m_host, device), b_host, m_host)
        self._pair_sets.append(pair_set)
        return pair_set

    def host_pairs(self, b_idx: Tensor, m_idx: Tensor) -> tuple[Tensor, Tensor] | None:
        """The pairs' values on the host without a device sync (see ``_pair_set_of``)."""
        pair_set = self._pair_set_of(b_idx, m_idx)
        return None if pair_set is None else (pair_set.b_host, pair_set.m_host)

    def _pair_set_of(self, b_idx: Tensor, m_idx: Tensor) -> _PairSet | None:
        """The pair set of these indices without a device sync: host tensors are looked up by
        value, device tensors must be the very ones ``pairs`` handed out (None otherwise)."""
        if b_idx.device.type == "cpu" and m_idx.device.type == "cpu":
            return self._pair_set_of_host(b_idx, m_idx)
        return next((s for s in self._pair_sets if s.b is b_idx and s.m is m_idx), None)

    def pair_scales(self, b_idx: Tensor, m_idx: Tensor) -> list[Tensor]:
        """``scales[l][b_idx, m_idx]`` ([P, C_l, *S_l]) for every level, gathered once for a list of
        (sample, modality) pairs: PASSION's one-modality fusion rows and the single-modality decoder
        use the same pairs, and sharing the copies keeps one of them for backward instead of two.
        Only the latest gathered set is kept."""
        pair_set = self._pair_set_of(b_idx, m_idx)
        if pair_set is not None and pair_set.rows is not None:
            return pair_set.rows
        if pair_set is not None and self._every_pair_in_order(pair_set.b_host, pair_set.m_host):
            rows = [s.flatten(0, 1) for s in self.scales]  # views, no copy
        else:
            rows = [pair_rows(s, b_idx, m_idx) for s in self.scales]
        if pair_set is not None:
            for other in self._pair_sets:
                other.rows = None
            pair_set.rows = rows
        return rows

    def _every_pair_in_order(self, b_host: Tensor, m_host: Tensor) -> bool:
        batch, mods = self.scales[0].shape[:2]
        if b_host.numel() != batch * mods:
            return False
        every_b, every_m = torch.ones(batch, mods, dtype=torch.bool).nonzero(as_tuple=True)
        return torch.equal(b_host, every_b) and torch.equal(m_host, every_m)


def decode_available(decoder: nn.Module, features: Features, mask: Tensor | None, num_classes: int) -> Tensor:
    """``decode_single`` for a decoder over [P, C_l, *S_l] scales: run it once on all available
    (b, m) pairs (``Features.pair_scales``) and return [B, M, num_classes, *S_0], zeros elsewhere."""
    first = features.scales[0]
    batch, mods = first.shape[:2]
    b, m = features.pairs(mask)
    shape = (batch, mods, num_classes) + tuple(first.shape[3:])
    if b.numel() == 0:
        return first.new_zeros(shape)
    logits = decoder(features.pair_scales(b, m))
    if b.numel() == batch * mods:
        return logits.reshape(shape)
    rows = logits.new_zeros((batch * mods,) + shape[2:]).index_copy(0, b * mods + m, logits)
    return rows.reshape(shape)


def pair_rows(t: Tensor, b_idx: Tensor, m_idx: Tensor) -> Tensor:
    """``t[b_idx, m_idx]`` for t [B, M, ...], as one index_select of the flattened B*M rows: the
    same values, but its backward adds whole rows where advanced indexing's accumulates element by
    element (5x slower forward+backward on [1, 4, 8, 80^3] on the CPU)."""
    return t.flatten(0, 1).index_select(0, b_idx * t.shape[1] + m_idx)


@dataclass
class FusedOutput:
    """Output of the fusion decoder.

    logits: [B, C, *spatial] at input resolution.
    aux_logits: auxiliary logits z^1..z^S (pre-softmax, possibly coarser); index 0 is s=1,
        the finest auxiliary scale, weighted 2^-1 by the objectives.
    decoder_features: decoder features g^1.. ; index 0 is the finest (used by PASSION's
        prototype distillation).
    """

    logits: Tensor
    aux_logits: list[Tensor] = field(default_factory=list)
    decoder_features: list[Tensor] = field(default_factory=list)

    @staticmethod
    def rows_of(outputs: list["FusedOutput"], rows: Tensor) -> "FusedOutput":
        """Rows `rows` of the outputs' rows stacked in order, for every tensor."""
        def pick(*ts: Tensor) -> Tensor:
            return (ts[0] if len(ts) == 1 else torch.cat(ts)).index_select(0, rows)

        return FusedOutput(pick(*(o.logits for o in outputs)),
                           [pick(*ts) for ts in zip(*(o.aux_logits for o in outputs))],
                           [pick(*ts) for ts in zip(*(o.decoder_features for o in outputs))])

    def split(self, n: int) -> tuple["FusedOutput", "FusedOutput"]:
        """(rows [:n], rows [n:]) of every tensor: a batched call back into its two groups."""
        parts = [(t[:n], t[n:]) for t in [self.logits, *self.aux_logits, *self.decoder_features]]
        a = len(self.aux_logits)
        first, second = ([p[i] for p in parts] for i in (0, 1))
        return tuple(FusedOutput(g[0], g[1:1 + a], g[1 + a:]) for g in (first, second))


class Backbone(nn.Module, abc.ABC):
    """Base class for all segmentation backbones; subclasses implement the three stages."""

    num_modalities: int
    num_classes: int
    spatial_dims: int = 3
    # module types whose activations train.activation_checkpointing recomputes (models/checkpointing.py)
    checkpoint_blocks: tuple[type[nn.Module], ...] = ()
    # those of them whose output row i depends on input row i alone (per-sample norms, no dropout) and
    # that return one tensor: checkpointed over several rows, they are recomputed one row at a time
    per_row_blocks: tuple[type[nn.Module], ...] = ()
    activation_checkpointing: str = "off"  # the mode set_activation_checkpointing applied

    @abc.abstractmethod
    def encode(self, x: Tensor, mask: Tensor) -> Features: ...

    @abc.abstractmethod
    def fuse(self, features: Features, mask: Tensor) -> FusedOutput: ...

    def fuse_single(self, features: Features, b_idx: Tensor, m_idx: Tensor) -> FusedOutput:
        """Fusion under the one-hot mask of m_idx[p] for sample b_idx[p], every pair p in ONE call.

        Default: gather the pairs' rows and call ``fuse`` once with the one-hot masks.
        """
        feats = features.map(lambda t: t.index_select(0, b_idx))
        masks = nn.functional.one_hot(m_idx, self.num_modalities).bool()
        return self.fuse(feats, masks)

    def fuse_teacher_and_singles(self, features: Features, mask: Tensor, b_idx: Tensor,
                                 m_idx: Tensor) -> tuple[FusedOutput, FusedOutput]:
        """(``fuse(features, mask)``, ``fuse_single(features, b_idx, m_idx)``): PASSION's teacher
        and students. Backbones whose decoder takes both row groups override this with ONE batched
        pass over B + P rows (same weights, same values); the default makes the two calls."""
        return self.fuse(features, mask), self.fuse_single(features, b_idx, m_idx)

    def fuse_teacher_and_students(self, features: Features, mask: Tensor, b_idx: Tensor,
                                  m_idx: Tensor) -> tuple[FusedOutput, FusedOutput]:
        """PASSION's teacher and students: ``fuse_teacher_and_singles``, except that a student
        whose one-hot mask is its own sample's mask (a sample with one modality) would compute
        exactly the teacher's row again when ``fuse`` draws nothing at random
        (``fuse_is_deterministic``). Its row then IS the teacher's row, not detached, so the
        student's gradient still flows through it, and only the other students run. Equal in
        values and gradients (up to float rounding) to fusing every student. Decided from the
        host copies of the mask and of the pairs (``Features.pairs``)."""
        host = features.host_pairs(b_idx, m_idx)
        if host is None or not self.fuse_is_deterministic():
            return self.fuse_teacher_and_singles(features, mask, b_idx, m_idx)
        b_host, m_host = host
        teacher_mask = host_mask(mask)
        own = (teacher_mask.sum(dim=1) == 1)[b_host] & teacher_mask[b_host, m_host]
        if not bool(own.any()):
            return self.fuse_teacher_and_singles(features, mask, b_idx, m_idx)
        batch = features.batch_size
        others = torch.zeros_like(teacher_mask)
        others[b_host[~own], m_host[~own]] = True
        if bool(others.any()):
            fused, computed = self.fuse_teacher_and_singles(features, mask, *features.pairs(others))
        else:
            fused, computed = self.fuse(features, mask), None
        # each pair's row in [teacher rows, computed student rows]
        rows = torch.where(own, b_host, batch + torch.cumsum(~own, dim=0) - 1)
        if computed is None and torch.equal(rows, torch.arange(batch)):
            return fused, fused
        return fused, FusedOutput.rows_of([fused] if computed is None else [fused, computed],
                                          to_device(rows, features.scales[0].device))

    def fuse_is_deterministic(self) -> bool:
        """Whether ``fuse`` gives the same output for the same input: not while a dropout layer
        is active (mmFormer's and M2FTrans's transformers train with dropout 0.1)."""
        return not (self.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                                          for m in self.modules()))

    @abc.abstractmethod
    def decode_single(self, features: Features, mask: Tensor | None = None) -> Tensor: ...

    def modality_parameters(self, m: int) -> list[nn.Parameter]:
        """Parameters that belong to modality m's encoder alone (gradient-modulating objectives
        such as OGM-GE scale them). Backbones with an `encoders` ModuleList get this for free."""
        encoders = getattr(self, "encoders", None)
        if isinstance(encoders, nn.ModuleList) and len(encoders) == self.num_modalities:
            return list(encoders[m].parameters())
        raise TypeError(f"{type(self).__name__} does not declare its per-modality encoder parameters; "
                        f"implement modality_parameters(m)")

    def encoder_modules(self) -> list[nn.Module]:
        """The modules ``encode`` runs (activation checkpointing's "decoder" mode leaves them alone)."""
        encoders = getattr(self, "encoders", None)
        if encoders is None:
            raise TypeError(f"{type(self).__name__} has no `encoders`; implement encoder_modules()")
        return [encoders]

    def set_activation_checkpointing(self, mode: str, row_at_a_time: bool = True) -> None:
        """off | decoder | all: recompute the blocks' activations in backward (same values);
        per-row blocks one row at a time unless `row_at_a_time` is False (models/checkpointing.py)."""
        from .checkpointing import set_activation_checkpointing

        set_activation_checkpointing(self, mode, row_at_a_time)

    def compile_stages(self, allow_cpu: bool = False, **options) -> list[nn.Module]:
        """torch.compile, in place, the submodules that encode / fuse / decode_single call
        (not on a CPU unless `allow_cpu`, see models/compile.py); returns them."""
        from .compile import compile_backbone

        return compile_backbone(self, allow_cpu=allow_cpu, **options)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(dtype=torch.bool)  # where the caller keeps it (see host_mask)
        return self.fuse(self.encode(x, mask), mask).logits

    @staticmethod
    def zero_unavailable(x: Tensor, mask: Tensor) -> Tensor:
        """Zero modality channels of x ([B, M, ...]) where mask ([B, M]) is False."""
        shape = mask.shape + (1,) * (x.dim() - 2)
        return x * to_device(mask.reshape(shape), x.device, x.dtype)
