"""RFNet (Ding et al., ICCV 2021) as configured by the PASSION reference code.

Architecture (base width b, M modalities, C classes, R = C regions):

- One encoder per modality, 4 scales with b, 2b, 4b, 8b channels; every scale is a
  (strided at scales 2-4) 3^3 conv followed by a residual pair of 3^3 convs.
- Fusion decoder: at every scale l (coarsest first) a region-prior generator (PRM)
  predicts region logits from the masked modality features (and, below the bottleneck,
  the decoder feature coming from the coarser scale); its softmax, *detached*, splits
  every modality feature into R regions; inside each region the modalities are weighted
  by a small MLP on region-pooled features and summed (region-aware fusion, RFM); the
  regions are merged by convs and concatenated with a plain shortcut fusion of the
  modalities. A U-Net decoder climbs the scales and a 1^3 conv gives the class logits.
- A separate, modality-shared U-Net decoder segments every modality on its own.

All convs are Conv + InstanceNorm (no affine, as the reference's ``normalization('in')``)
+ LeakyReLU(0.2) with reflect padding, Kaiming-normal weights. At the default
configuration (M = 4, C = 4, b = 8) the model has exactly 2,381,792 parameters, the
count of the reference ``Model``.

Mapping onto the backbone contract (see interface.py):

- ``encode``: the reference skips an encoder when ``mask[0, m]`` (the mask of the FIRST
  sample) is off and substitutes zeros for the whole batch. Here every encoder runs only
  on the samples that have its modality and the others get zero features, so masks may
  differ per sample. (In the reference 'pdt' mode the encoders see all four images; a
  caller reproduces that by passing the full availability mask to ``encode`` and the
  drawn subset to ``fuse``.)
- ``fuse``: the reference's PRM and RFM already zero features per sample (``y[mask] =
  x[mask]`` with a [B, M] mask); we do the same by multiplying with the per-sample mask, so
  a batch of repeated features with different one-hot masks is one call. Its one-hot
  PASSION passes used a [1, M] mask and therefore only worked for batch 1.
- ``fuse_single``: PASSION's one-hot passes without the M-1 zero modalities: the stacked-modality
  1^3 convs (region-prior embedding, shortcut) use the present modality's weight columns only,
  and the region fusion's sums over modalities have that single term. Same function as ``fuse``
  with one-hot masks; four passes at 80^3 measured 11-13% faster (forward+backward).
- ``aux_logits``: the region-prior logits of the PASSION variant ("prm_generator_pk",
  no softmax inside), finest first [z^1 (full), z^2 (1/2), z^3 (1/4), z^4 (1/8)], at their
  native resolution; the objective applies softmax then upsamples. The RFMs use
  ``softmax(prm_logits).detach()`` exactly as the reference.
- ``decoder_features``: one feature per scale, finest first; index 0 is the output of the
  last decoder block before the 1^3 classifier (the reference's ``de_x1``, the only one
  PASSION uses); then the outputs of the 1/2 and 1/4 decoder blocks and the fused 1/8
  bottleneck feature. (The reference's tuple holds intermediate post-upsampling tensors
  instead; nothing consumes them.)
- ``decode_single``: the shared separate decoder, returning LOGITS (the reference returns
  its softmax); only available (sample, modality) pairs are decoded, the rest are zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import register_model
from .blocks import ConcatConvNormAct, ConvNormAct, UpsampleConvNormAct, conv_cls, kaiming_init, postnorm_block
from .interface import Backbone, Features, FusedOutput, decode_available, modality_samples, to_device
from .rfnet_fusion import RegionAwareFusion, RegionPriorGenerator
from .rows import Rows

NUM_SCALES = 4


class _EncoderStage(nn.Module):
    """Entry conv (strided except at scale 1) + residual pair of convs."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dims: int):
        super().__init__()
        self.entry = postnorm_block(in_ch, out_ch, 3, stride, dims)
        self.res = nn.Sequential(postnorm_block(out_ch, out_ch, dims=dims), postnorm_block(out_ch, out_ch, dims=dims))

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(x)
        return x + self.res(x)


class RFNetEncoder(nn.Module):
    """Single-modality encoder: [N, 1, *S] -> 4 scales with w, 2w, 4w, 8w channels."""

    def __init__(self, width: int, dims: int):
        super().__init__()
        chans = [width * 2 ** i for i in range(NUM_SCALES)]
        ins = [1] + chans[:-1]
        self.stages = nn.ModuleList(
            _EncoderStage(i, o, 1 if k == 0 else 2, dims) for k, (i, o) in enumerate(zip(ins, chans)))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class _UpBlock(nn.Module):
    """One decoder level: upsample + conv (halve channels), concat a skip, conv, 1^3 conv."""

    def __init__(self, in_ch: int, dims: int):
        super().__init__()
        out_ch = in_ch // 2
        self.up_conv = postnorm_block(in_ch, out_ch, dims=dims, cls=UpsampleConvNormAct)  # reference d{l}_c1
        self.merge = postnorm_block(2 * out_ch, out_ch, dims=dims, cls=ConcatConvNormAct)  # reference d{l}_c2
        self.out = postnorm_block(out_ch, out_ch, kernel=1, dims=dims)                     # reference d{l}_out

    def up(self, x: Tensor, like) -> Tensor:
        """like: a tensor or a spatial size."""
        return self.up_conv(x, like)

    def combine(self, first: Tensor, second: Tensor) -> Tensor:
        return self.out(self.merge(first, second))


class SeparateDecoder(nn.Module):
    """The modality-shared decoder (reference ``Decoder_sep``), returning logits."""

    def __init__(self, width: int, num_classes: int, dims: int):
        super().__init__()
        # blocks[0] goes 8w -> 4w (reference d3), blocks[2] goes 2w -> w (reference d1)
        self.blocks = nn.ModuleList(_UpBlock(width * 2 ** k, dims) for k in (3, 2, 1))
        self.seg = conv_cls(dims)(width, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block.combine(block.up(x, skip), skip)  # reference order: cat(decoder, skip)
        return self.seg(x)


class FusionDecoder(nn.Module):
    """The fusion decoder (reference ``Decoder_fuse``), generic in M, C and width."""

    def __init__(self, width: int, num_modalities: int, num_classes: int, dims: int):
        super().__init__()
        chans = [width * 2 ** i for i in range(NUM_SCALES)]  # finest first
        self.prm = nn.ModuleList(
            RegionPriorGenerator(ch, num_modalities, num_classes, dims, last_stage=(i == NUM_SCALES - 1))
            for i, ch in enumerate(chans))
        self.rfm = nn.ModuleList(RegionAwareFusion(ch, num_modalities, num_classes, dims) for ch in chans)
        # blocks[i] lifts scale i+1 (channels chans[i+1]) to scale i (channels chans[i])
        self.blocks = nn.ModuleList(_UpBlock(chans[i + 1], dims) for i in range(NUM_SCALES - 1))
        self.seg = conv_cls(dims)(width, num_classes, 1)

    def forward(self, feats: list[Tensor | Rows]) -> FusedOutput:
        """feats: masked per-modality features [B, M, C_l, *S_l] per scale, finest first, or Rows
        (stacked rows, then one-modality rows); the output rows are in that order."""
        feats = [Rows.of(f) for f in feats]
        priors: list[Tensor] = [None] * NUM_SCALES
        dec_feats: list[Tensor] = [None] * NUM_SCALES
        top = NUM_SCALES - 1
        y = feats[top]
        priors[top] = self.prm[top](y, None)
        x = self.rfm[top](y, torch.softmax(priors[top], dim=1).detach())
        dec_feats[top] = x
        for level in range(top - 1, -1, -1):
            y = feats[level]
            block = self.blocks[level]
            up = block.up(x, y.spatial)
            priors[level] = self.prm[level](y, up)
            fused = self.rfm[level](y, torch.softmax(priors[level], dim=1).detach())
            x = block.combine(fused, up)  # reference order: cat(RFM output, decoder feature)
            dec_feats[level] = x
        return FusedOutput(logits=self.seg(x), aux_logits=priors, decoder_features=dec_feats)


def _as_tuple(value, dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"rfnet: {name} {value} has {len(value)} entries but spatial_dims is {dims}")
    return value


@register_model("rfnet")
class RFNet(Backbone):
    """RFNet backbone (see module docstring for the mapping onto the contract)."""

    checkpoint_blocks = (RegionPriorGenerator, RegionAwareFusion, ConvNormAct)
    per_row_blocks = checkpoint_blocks

    def __init__(self, num_modalities: int = 4, num_classes: int = 4, base_width: int = 8,
                 patch_size=(80, 80, 80), spatial_dims: int = 3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"rfnet: spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_modalities < 1 or num_classes < 2:
            raise ValueError(f"rfnet: need num_modalities >= 1 and num_classes >= 2, "
                             f"got {num_modalities} and {num_classes}")
        if base_width < 4 or base_width % 2:
            raise ValueError(f"rfnet: base_width must be even and >= 4 (region fusion halves and "
                             f"quarters it), got {base_width}")
        self.patch_size = _as_tuple(patch_size, spatial_dims, "patch_size")
        self._check_spatial(self.patch_size, "patch_size")
        self.num_modalities = num_modalities
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.base_width = base_width
        self.encoders = nn.ModuleList(RFNetEncoder(base_width, spatial_dims) for _ in range(num_modalities))
        self.decoder_fuse = FusionDecoder(base_width, num_modalities, num_classes, spatial_dims)
        self.decoder_sep = SeparateDecoder(base_width, num_classes, spatial_dims)
        kaiming_init(self)

    @staticmethod
    def _check_spatial(size, what: str) -> None:
        factor = 2 ** (NUM_SCALES - 1)
        if any(s % factor or s < 2 * factor for s in size):
            raise ValueError(f"rfnet: {what} {tuple(size)} must be multiples of {factor} and >= {2 * factor} "
                             f"(4 scales, reflect padding at the coarsest)")

    def modality_parameters(self, m: int):
        """Parameters that belong to modality m only (its encoder)."""
        return self.encoders[m].parameters()

    def _check_mask(self, mask: Tensor, batch: int) -> Tensor:
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != self.num_modalities:
            raise ValueError(f"rfnet: mask must be [B={batch}, M={self.num_modalities}], got {list(mask.shape)}")
        return mask.to(dtype=torch.bool)

    def encode(self, x: Tensor, mask: Tensor) -> Features:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.num_modalities:
            raise ValueError(f"rfnet: images must be [B, M={self.num_modalities}, *spatial] with "
                             f"{self.spatial_dims} spatial dims, got {list(x.shape)}")
        self._check_spatial(x.shape[2:], "input size")
        mask = self._check_mask(mask, x.shape[0])
        samples = modality_samples(mask, x.device)  # before any kernel: no wait for the device
        x = self.zero_unavailable(x, mask)
        batch = x.shape[0]
        per_modality: list[list[Tensor] | None] = []
        for m, (encoder, idx) in enumerate(zip(self.encoders, samples)):
            if idx is None:
                per_modality.append(encoder(x[:, m:m + 1]))
            elif idx.numel() == 0:
                per_modality.append(None)
            else:
                feats = encoder(x[idx, m:m + 1])
                per_modality.append([f.new_zeros((batch,) + f.shape[1:]).index_copy(0, idx, f) for f in feats])
        ref = next((f for f in per_modality if f is not None), None)
        scales = []
        for level in range(NUM_SCALES):
            if ref is None:
                size = [s // 2 ** level for s in x.shape[2:]]
                like = x.new_zeros((batch, self.base_width * 2 ** level, *size))
            else:
                like = ref[level]
            scales.append(torch.stack([f[level] if f is not None else torch.zeros_like(like)
                                       for f in per_modality], dim=1))
        return Features(scales)

    def fuse(self, features: Features, mask: Tensor) -> FusedOutput:
        mask = to_device(self._check_mask(mask, features.batch_size), features.scales[0].device)
        feats = [self.zero_unavailable(f, mask) for f in features.scales]
        return self.decoder_fuse(feats)

    def fuse_single(self, features: Features, b_idx: Tensor, m_idx: Tensor) -> FusedOutput:
        """One-hot fusion without the M-1 zero modalities: equal to ``fuse`` with one-hot masks
        (up to float rounding) but the zero-filled [P, M, ...] features are never built."""
        device = features.scales[0].device
        b_idx, m_idx = to_device(b_idx, device), to_device(m_idx, device)
        return self.decoder_fuse([Rows(single=one, present=m_idx) for one in features.pair_scales(b_idx, m_idx)])

    def fuse_teacher_and_singles(self, features: Features, mask: Tensor, b_idx: Tensor,
                                 m_idx: Tensor) -> tuple[FusedOutput, FusedOutput]:
        """``fuse`` and ``fuse_single`` as ONE decoder pass over B + P rows (same values)."""
        device = features.scales[0].device
        mask = to_device(self._check_mask(mask, features.batch_size), device)
        b_idx, m_idx = to_device(b_idx, device), to_device(m_idx, device)
        rows = [Rows(self.zero_unavailable(f, mask), one, m_idx)
                for f, one in zip(features.scales, features.pair_scales(b_idx, m_idx))]
        return self.decoder_fuse(rows).split(features.batch_size)

    def decode_single(self, features: Features, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            mask = self._check_mask(mask, features.batch_size)
        return decode_available(self.decoder_sep, features, mask, self.num_classes)
