"""mmFormer (Zhang et al., MICCAI 2022) as configured in the PASSION paper's public code.

Architecture (defaults: base width C = 8, 4 modalities, 4 classes, 80^3 patches):

- one convolutional encoder per modality, 5 scales of widths C, 2C, 4C, 8C, 16C; every stage is a
  (strided) conv followed by a residual pair of convs. Blocks are *pre-norm*
  (InstanceNorm without affine -> LeakyReLU(0.2) -> conv, reflect padding), the first conv is bare;
- intra-modal transformer per modality at the bottleneck: 1x1 conv 16C -> E (E = 512), learnable
  position embedding over the patch/16 token grid, one pre-norm block (8 heads, MLP 4096);
- inter-modal transformer over the concatenated tokens of all modalities (absent ones zero), using
  the concatenated per-modality position embeddings, then a 1x1 conv M*E -> M*16C;
- fusion decoder: at each scale a 3-conv fusion block maps the stacked modality features
  (M*C_l channels) to C_l, merged with the upsampled coarser decoder feature; deep supervision by
  1x1 classifiers at 4 scales;
- shared single-modality decoder (U-Net decoder over one modality's skips).

Widths of the transformer follow the base width (E = 64*C, MLP = 8*E) so that tiny test models
stay tiny; at C = 8 they are the reference's 512 / 4096.

Where the reference decides per *batch* (``if mask[0, m]``: run encoder m or use zeros), this
implementation decides per sample: encoder m runs on exactly the samples that have modality m and
its features are zero elsewhere. The reference's T2-only distillation pass masked the bottleneck
with the T1 mask; here ``fuse`` always takes the mask from the caller, per sample.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import register_model
from .blocks import (ConcatConvNormAct, ConcatInputs, UpsampleConvNormAct, UpsampleInput, conv_cls, kaiming_init,
                     norm_act, norm_cls, pointwise_conv_one_modality, postnorm_block)
from .interface import Backbone, Features, FusedOutput, decode_available, modality_samples, to_device
from .rows import Rows
from .transformer import (PositionEmbedding, Transformer, TransformerBlock, grid_to_tokens, token_grid,
                          tokens_to_grid)

NUM_SCALES = 5


# --------------------------------------------------------------------------- conv pieces


class PreNormConv(nn.Module):
    """InstanceNorm (no affine) -> LeakyReLU(0.2) -> conv with reflect padding (reference prenorm)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, dims: int = 3):
        super().__init__()
        self.norm = norm_cls(dims)(in_ch, affine=False)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        pad = kernel // 2
        self.conv = conv_cls(dims)(in_ch, out_ch, kernel, stride=stride, padding=pad,
                                   padding_mode="reflect" if pad else "zeros", bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(norm_act(self.norm, self.act, x))


class UpsamplePreNormConv(UpsampleInput, PreNormConv):
    """``linear_resize`` then the pre-norm conv."""


class ConcatPreNormConv(ConcatInputs, PreNormConv):
    """The pre-norm conv of the concatenated inputs."""


def prenorm_block(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, dims: int = 3) -> nn.Module:
    return PreNormConv(in_ch, out_ch, kernel, stride, dims)


class BlockFamily(NamedTuple):
    """One conv block type, ``(in_ch, out_ch, kernel, stride, dims) -> module``, and its variants
    that upsample their input / concatenate their inputs inside the block (blocks.UpsampleInput,
    blocks.ConcatInputs): a decoder built from them keeps neither the upsampled map nor the
    concatenation under activation checkpointing."""

    plain: Callable[..., nn.Module]
    upsample: Callable[..., nn.Module]
    concat: Callable[..., nn.Module]


PRENORM = BlockFamily(prenorm_block, UpsamplePreNormConv, ConcatPreNormConv)
POSTNORM = BlockFamily(postnorm_block, partial(postnorm_block, cls=UpsampleConvNormAct),
                       partial(postnorm_block, cls=ConcatConvNormAct))


class EncoderStage(nn.ModuleList):
    """One scale of a modality encoder, [c1, c2, c3]: ``y = c1(x)``, then ``y + c3(c2(y))``.

    The unit that ``activation_checkpointing: all`` recomputes: it keeps its input only, not the
    two maps inside the residual pair.
    """

    def forward(self, x: Tensor) -> Tensor:
        c1, c2, c3 = self
        x = c1(x)
        return x + c3(c2(x))


class ModalityEncoder(nn.Module):
    """Five-scale residual encoder of one modality: widths w, 2w, 4w, 8w, 16w.

    Stage l (EncoderStage): ``y = c1(x)`` (stride 2 for l > 1), ``y = y + c3(c2(y))``. `block`
    builds the convs; the first conv is `first` (a bare conv in mmFormer, a block in M2FTrans).
    """

    def __init__(self, width: int, dims: int, block, first: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList()
        in_ch = width
        for level in range(NUM_SCALES):
            out_ch = width * 2 ** level
            c1 = first if level == 0 else block(in_ch, out_ch, 3, 2, dims)
            self.stages.append(EncoderStage([c1, block(out_ch, out_ch, 3, 1, dims),
                                             block(out_ch, out_ch, 3, 1, dims)]))
            in_ch = out_ch

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SeparateDecoder(nn.Module):
    """The shared single-modality decoder (reference ``Decoder_sep``); returns logits."""

    def __init__(self, width: int, num_classes: int, dims: int, blocks: BlockFamily):
        super().__init__()
        self.ups = nn.ModuleList()  # level l (0-based, finest 0): up-conv from 2w to w, merge, 1x1
        for level in range(NUM_SCALES - 1):
            w = width * 2 ** level
            self.ups.append(nn.ModuleList([blocks.upsample(2 * w, w, 3, 1, dims),
                                           blocks.concat(2 * w, w, 3, 1, dims), blocks.plain(w, w, 1, 1, dims)]))
        self.seg = conv_cls(dims)(width, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = feats[-1]
        for level in reversed(range(NUM_SCALES - 1)):
            c1, c2, out = self.ups[level]
            skip = feats[level]
            x = out(c2(c1(x, skip), skip))
        return self.seg(x)


# --------------------------------------------------------------------------- shared helpers


def check_config(num_modalities: int, num_classes: int, base_width: int, patch_size, spatial_dims: int,
                 ) -> tuple[int, ...]:
    """Validate the generic options; returns the bottleneck token grid."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims:
        raise ValueError(f"patch_size {patch} has {len(patch)} axes but spatial_dims is {spatial_dims}")
    if num_modalities < 1 or num_classes < 2 or base_width < 1:
        raise ValueError(f"need num_modalities >= 1, num_classes >= 2, base_width >= 1; got "
                         f"{num_modalities}, {num_classes}, {base_width}")
    return token_grid(patch, 2 ** (NUM_SCALES - 1))


def check_input(x: Tensor, mask: Tensor, num_modalities: int, patch: tuple[int, ...]) -> Tensor:
    if x.dim() != len(patch) + 2 or x.shape[1] != num_modalities:
        raise ValueError(f"expected images [B, {num_modalities}, *{patch}], got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != patch:
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} differs from the patch_size {patch} "
                         f"the position embeddings were built for")
    if tuple(mask.shape) != (x.shape[0], num_modalities):
        raise ValueError(f"mask must be [B, M] = [{x.shape[0]}, {num_modalities}], got {tuple(mask.shape)}")
    return mask.to(dtype=torch.bool)  # where the caller keeps it (interface.host_mask)


def scatter_batch(t: Tensor, index: Tensor | None, batch: int) -> Tensor:
    """Put rows of t (computed for samples `index`) into a zero tensor of `batch` rows."""
    if index is None:
        return t
    return t.new_zeros((batch,) + tuple(t.shape[1:])).index_copy(0, index, t)


def run_per_modality(fn, x: Tensor, mask: Tensor) -> list[list[Tensor]]:
    """Apply fn(m, x_m) -> list of tensors on the samples that have modality m; zeros elsewhere.

    Returns, per modality, the list scattered back to the full batch. A modality that no sample
    has gets zeros shaped (and typed, e.g. under autocast) like another modality's output.
    """
    batch = x.shape[0]
    out: list = []
    for m, index in enumerate(modality_samples(mask, x.device)):
        if index is None:
            out.append(fn(m, x[:, m:m + 1]))
        elif index.numel() == 0:
            out.append(None)
        else:
            out.append([scatter_batch(t, index, batch) for t in fn(m, x[index, m:m + 1])])
    ref = next((o for o in out if o is not None), None)
    if ref is None:
        raise ValueError("every sample of the batch has no available modality")
    return [o if o is not None else [torch.zeros_like(t) for t in ref] for o in out]


# --------------------------------------------------------------------------- mmFormer


class FusionBlock(nn.Sequential):
    """Reference ``fusion_prenorm``: (M*w -> w, 1x1), (w -> w, 3x3), (w -> w, 1x1), pre-norm.

    The reference sizes the input with ``num_cls`` (4 = number of classes), which is really the
    number of modalities; here it is the number of modalities.
    """

    def __init__(self, in_ch: int, width: int, dims: int):
        super().__init__(prenorm_block(in_ch, width, 1, 1, dims), prenorm_block(width, width, 3, 1, dims),
                         prenorm_block(width, width, 1, 1, dims))
        self.num_modalities = in_ch // width

    def forward(self, x: Tensor | Rows) -> Tensor:
        """x: stacked features flattened to [B, M*w, *S], or Rows (stacked rows [B, M, w, *S], then
        one-modality rows). One module call, so activation checkpointing recomputes the block as
        one unit and keeps only its input."""
        layers = super().forward
        if isinstance(x, Rows):
            return x.apply(lambda full: layers(full.flatten(1, 2)), self._one_modality)
        return layers(x)

    def _one_modality(self, x: Tensor, present: Tensor) -> Tensor:
        """The block on stacked features where row p holds only modality present[p] (x: its
        [P, C, ...] channels). Instance norm is per channel and maps the all-zero channels of
        the absent modalities to zero, so only the present block reaches the first conv."""
        first = self[0]
        y = norm_act(first.norm, first.act, x)
        y = pointwise_conv_one_modality(first.conv, y, present, self.num_modalities)
        for block in list(self)[1:]:
            y = block(y)
        return y


class MMFormerFusionDecoder(nn.Module):
    """Reference ``Decoder_fuse``: fusion blocks per scale, U-Net merge, deep supervision."""

    def __init__(self, width: int, num_modalities: int, num_classes: int, dims: int):
        super().__init__()
        conv = conv_cls(dims)
        widths = [width * 2 ** level for level in range(NUM_SCALES)]
        self.num_modalities = num_modalities
        self.fusion = nn.ModuleList(FusionBlock(num_modalities * w, w, dims) for w in widths)
        # level l < 4: c1 maps the upsampled level-(l+1) feature 2w -> w; c2 merges; out is 1x1
        self.up_convs = nn.ModuleList(PRENORM.upsample(2 * w, w, 3, 1, dims) for w in widths[:-1])
        self.merge = nn.ModuleList(PRENORM.concat(2 * w, w, 3, 1, dims) for w in widths[:-1])
        self.outs = nn.ModuleList(prenorm_block(w, w, 1, 1, dims) for w in widths[:-1])
        # deep supervision on the decoder features of levels 1..4 (coarser than the output)
        self.aux_heads = nn.ModuleList(conv(w, num_classes, 1) for w in widths[1:])
        self.seg = conv(width, num_classes, 1)

    def forward(self, skips: Sequence[Tensor | Rows], bottleneck: Tensor) -> FusedOutput:
        """skips: masked modality features [B, M, C_l, ...] of levels 0..3, or Rows (stacked rows,
        then one-modality rows); bottleneck [rows, M*16C, *grid] in the same row order."""
        feats = [None] * NUM_SCALES
        feats[-1] = self.fusion[-1](bottleneck)
        for level in reversed(range(NUM_SCALES - 1)):
            skip = Rows.of(skips[level])
            up = self.up_convs[level](feats[level + 1], skip.spatial)
            feats[level] = self.outs[level](self.merge[level](self.fusion[level](skip), up))
        aux = [head(f) for head, f in zip(self.aux_heads, feats[1:])]
        return FusedOutput(logits=self.seg(feats[0]), aux_logits=aux, decoder_features=feats)


@register_model("mmformer")
class MMFormer(Backbone):
    """mmFormer behind the backbone contract.

    Features.scales: the 5 per-modality conv scales [B, M, C_l, ...] (zero where absent);
    Features.extra["intra"]: the intra-modal transformer output [B, M, E, *grid] (zero where absent).

    Options: transformer_dim (E, default 64*base_width), mlp_dim (default 8*E), num_heads (8),
    depth (1), dropout (0.1), token_layout ("reference" | "spatial", see ``fuse``).
    """

    checkpoint_blocks = (EncoderStage, FusionBlock, PreNormConv, TransformerBlock)
    per_row_blocks = (EncoderStage, FusionBlock, PreNormConv)  # not the transformer: dropout draws per batch

    def __init__(self, num_modalities: int = 4, num_classes: int = 4, base_width: int = 8,
                 patch_size: Sequence[int] = (80, 80, 80), spatial_dims: int = 3,
                 transformer_dim: int | None = None, mlp_dim: int | None = None, num_heads: int = 8,
                 depth: int = 1, dropout: float = 0.1, token_layout: str = "reference"):
        super().__init__()
        self.grid = check_config(num_modalities, num_classes, base_width, patch_size, spatial_dims)
        if token_layout not in ("reference", "spatial"):
            raise ValueError(f"token_layout must be 'reference' or 'spatial', got {token_layout!r}")
        self.num_modalities, self.num_classes, self.spatial_dims = num_modalities, num_classes, spatial_dims
        self.patch_size = tuple(int(p) for p in patch_size)
        self.token_layout = token_layout
        dim = int(transformer_dim or 64 * base_width)
        mlp = int(mlp_dim or 8 * dim)
        self.transformer_dim = dim
        conv = conv_cls(spatial_dims)
        bottom = 16 * base_width

        self.encoders = nn.ModuleList(
            ModalityEncoder(base_width, spatial_dims, prenorm_block, conv(1, base_width, 3, padding=1,
                                                                            padding_mode="reflect"))
            for _ in range(num_modalities))
        self.token_convs = nn.ModuleList(conv(bottom, dim, 1) for _ in range(num_modalities))
        self.pos = nn.ModuleList(PositionEmbedding.for_grid(self.grid, dim) for _ in range(num_modalities))
        self.intra_transformers = nn.ModuleList(Transformer(dim, depth, num_heads, mlp, dropout)
                                                for _ in range(num_modalities))
        self.inter_transformer = Transformer(dim, depth, num_heads, mlp, dropout)
        self.inter_conv = conv(num_modalities * dim, num_modalities * bottom, 1)
        self.decoder_fuse = MMFormerFusionDecoder(base_width, num_modalities, num_classes, spatial_dims)
        self.decoder_sep = SeparateDecoder(base_width, num_classes, spatial_dims, PRENORM)
        kaiming_init(self)

    def modality_parameters(self, m: int) -> list[nn.Parameter]:
        """Parameters used only for modality m (encoder, token conv, intra-modal transformer).

        The position embedding of m is excluded: the inter-modal transformer adds every modality's
        embedding even to absent (zero) tokens, as the reference does.
        """
        return [*self.encoders[m].parameters(), *self.token_convs[m].parameters(),
                *self.intra_transformers[m].parameters()]

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoders, self.token_convs, self.intra_transformers]

    def _encode_one(self, m: int, x: Tensor) -> list[Tensor]:
        feats = self.encoders[m](x)
        tokens = grid_to_tokens(self.token_convs[m](feats[-1]))
        intra = self.intra_transformers[m](tokens, self.pos[m]())
        return feats + [tokens_to_grid(intra, self.grid)]

    def encode(self, x: Tensor, mask: Tensor) -> Features:
        mask = check_input(x, mask, self.num_modalities, self.patch_size)
        x = self.zero_unavailable(x, mask)
        per_mod = run_per_modality(self._encode_one, x, mask)
        stacked = [torch.stack([f[i] for f in per_mod], dim=1) for i in range(NUM_SCALES + 1)]
        return Features(scales=stacked[:NUM_SCALES], extra={"intra": stacked[NUM_SCALES]})

    def fuse(self, features: Features, mask: Tensor) -> FusedOutput:
        """Fusion decoder under a per-sample mask.

        Absent modalities' skips and intra-modal tokens are zeroed per sample. The inter-modal
        transformer attends over all M*N tokens without an attention mask: the reference zeroes the
        absent tokens (which then carry only their position embedding) rather than masking them,
        and this implementation does the same, per sample.

        token_layout: the reference turns the [B, M*N, E] token sequence back into a grid with a
        plain ``view(B, *grid, M*E)``, so grid cell n holds tokens M*n .. M*n+M-1 of the
        modality-major sequence (not the M tokens of location n). "reference" reproduces that
        exactly (default, for faithful reproduction); "spatial" stacks the M tokens of each location.
        """
        mask = to_device(mask, features.scales[0].device, torch.bool)
        skips = [self.zero_unavailable(s, mask) for s in features.scales[:NUM_SCALES - 1]]
        intra = self.zero_unavailable(features.extra["intra"], mask)  # [B, M, E, *grid]
        return self.decoder_fuse(skips, self._inter_modal(intra))

    def fuse_single(self, features: Features, b_idx: Tensor, m_idx: Tensor) -> FusedOutput:
        """One-hot fusion with the skips of the present modality only: equal to ``fuse`` with
        one-hot masks (up to float rounding). The zero skips of the other modalities normalise to
        zero in the fusion blocks' pre-norm, so they are never built; the transformer still sees
        all M*N tokens (absent ones zero), exactly as in ``fuse``."""
        device = features.scales[0].device
        b_idx, m_idx = to_device(b_idx, device), to_device(m_idx, device)
        skips = [Rows(single=one, present=m_idx) for one in features.pair_scales(b_idx, m_idx)[:NUM_SCALES - 1]]
        return self.decoder_fuse(skips, self._inter_modal(self._one_hot_intra(features, b_idx, m_idx)))

    def fuse_teacher_and_singles(self, features: Features, mask: Tensor, b_idx: Tensor,
                                 m_idx: Tensor) -> tuple[FusedOutput, FusedOutput]:
        """``fuse`` and ``fuse_single`` as ONE transformer and decoder pass over B + P rows."""
        device = features.scales[0].device
        mask = to_device(mask, device, torch.bool)
        b_idx, m_idx = to_device(b_idx, device), to_device(m_idx, device)
        skips = [Rows(self.zero_unavailable(s, mask), one, m_idx)
                 for s, one in zip(features.scales[:NUM_SCALES - 1], features.pair_scales(b_idx, m_idx))]
        intra = torch.cat((self.zero_unavailable(features.extra["intra"], mask),
                           self._one_hot_intra(features, b_idx, m_idx)))
        return self.decoder_fuse(skips, self._inter_modal(intra)).split(features.batch_size)

    def _one_hot_intra(self, features: Features, b_idx: Tensor, m_idx: Tensor) -> Tensor:
        """Intra-modal tokens of sample b_idx[p] with only modality m_idx[p] kept: [P, M, E, *grid]."""
        onehot = nn.functional.one_hot(m_idx, self.num_modalities).bool()
        return self.zero_unavailable(features.extra["intra"].index_select(0, b_idx), onehot)

    def _inter_modal(self, intra: Tensor) -> Tensor:
        """Masked intra-modal tokens [B, M, E, *grid] -> inter-modal bottleneck [B, M*16C, *grid]."""
        batch, mods, dim = intra.shape[:3]
        tokens = intra.flatten(3).transpose(2, 3).reshape(batch, -1, dim)  # modality-major
        pos = torch.cat([p() for p in self.pos], dim=1)
        out = self.inter_transformer(tokens, pos)
        if self.token_layout == "reference":
            grid = out.reshape(batch, *self.grid, mods * dim).movedim(-1, 1)
        else:
            grid = out.reshape(batch, mods, -1, dim).transpose(2, 3).reshape(batch, mods * dim, *self.grid)
        return self.inter_conv(grid.contiguous())

    def decode_single(self, features: Features, mask: Tensor | None = None) -> Tensor:
        return decode_available(self.decoder_sep, features, mask, self.num_classes)
