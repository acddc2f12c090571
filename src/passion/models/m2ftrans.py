"""M2FTrans (Shi et al.) as in Jun-Jie-Shi/M2FTrans and the PASSION paper's public code.

mmFormer-like, with a masked multi-modal fusion transformer (defaults: base width C = 8, 4
modalities, 4 classes, 80^3 patches):

- one encoder per modality, 5 scales C..16C, *post-norm* blocks (conv -> InstanceNorm without
  affine -> LeakyReLU(0.2), reflect padding), residual stages as in mmFormer;
- bottleneck: the M per-modality token sets (16C channels, patch/16 grid, no projection) plus a set
  of learnable *fusion tokens* (normal init) of the same grid, one shared position embedding over
  all (M+1)*N tokens, and a 3-block pre-norm transformer (8 heads, MLP 4096) whose attention is
  masked: modality tokens attend only within their own modality (intra-modal), fusion tokens attend
  to themselves and to the tokens of the *available* modalities;
- modality weights: the first block's attention of the fusion tokens on each modality's tokens,
  summed over heads and fusion queries, reweights that modality's bottleneck output and (nearest
  upsampled) its skip features at every scale (detached, as in the reference);
- fusion decoder: at the two coarsest scales a masked channel cross-attention ("multi-cross
  token") lets the decoder feature query the modality features (key/value maps per modality,
  channels of absent modalities masked out); at the three finest scales a 3-conv fusion block of
  the stacked modality features; region-prior-style 2-conv heads give auxiliary logits at all
  5 scales;
- shared single-modality decoder, post-norm.

The reference builds its masks with a loop over the batch (per sample already); this
implementation builds them vectorised from the caller's per-sample mask. Where the reference
decides per *batch* whether to run an encoder (``if mask[0, m]``), here encoder m runs on exactly
the samples that have modality m.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register_model
from .blocks import ConvNormAct, conv_cls, kaiming_init, postnorm_block
from .interface import Backbone, Features, FusedOutput, decode_available, to_device
from .mmformer import (NUM_SCALES, POSTNORM, EncoderStage, ModalityEncoder, SeparateDecoder, check_config,
                       check_input, run_per_modality)
from .rows import Rows
from .transformer import PositionEmbedding, Transformer, TransformerBlock, tokens_to_grid

PRM_HIDDEN = 16  # hidden width of the auxiliary heads, fixed in the reference


def channel_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm over the channel axis of [B, C, *spatial]."""
    return norm(x.movedim(1, -1)).movedim(-1, 1)


class DepthWiseConvBlock(nn.Module):
    """1x1 conv -> LN -> GELU -> depthwise 3x3 -> LN -> GELU -> 1x1 conv -> LN (eps 1e-6)."""

    def __init__(self, in_ch: int, out_ch: int, dims: int):
        super().__init__()
        conv = conv_cls(dims)
        self.conv1 = conv(in_ch, in_ch, 1)
        self.norm1 = nn.LayerNorm(in_ch, eps=1e-6)
        self.conv2 = conv(in_ch, in_ch, 3, padding=1, groups=in_ch)
        self.norm2 = nn.LayerNorm(in_ch, eps=1e-6)
        self.conv3 = conv(in_ch, out_ch, 1)
        self.norm3 = nn.LayerNorm(out_ch, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(channel_layer_norm(self.norm1, self.conv1(x)))
        x = F.gelu(channel_layer_norm(self.norm2, self.conv2(x)))
        return channel_layer_norm(self.norm3, self.conv3(x))


class GroupConvBlock(nn.Module):
    """Convolutional FFN: GELU(x + LN(pw(GELU(LN(grouped 3x3(GELU(LN(pw(x))))))))).

    The grouped conv uses `dim` groups on dim*expand channels, as in the reference.
    """

    def __init__(self, dim: int, expand: int, dims: int):
        super().__init__()
        conv = conv_cls(dims)
        hidden = dim * expand
        self.pwconv1 = conv(dim, hidden, 1)
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.dwconv = conv(hidden, hidden, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.pwconv2 = conv(hidden, dim, 1)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(channel_layer_norm(self.norm1, self.pwconv1(x)))
        y = F.gelu(channel_layer_norm(self.norm2, self.dwconv(y)))
        y = channel_layer_norm(self.norm3, self.pwconv2(y))
        return F.gelu(x + y)


class MaskedChannelAttention(nn.Module):
    """Reference ``MultiMaskAttentionLayer``: channel attention of a query map on M modality maps.

    Tokens are channels: the query's C channels attend over the M*C key channels (each a flattened
    map), scaled by 1/sqrt(voxels); the key channels of modalities absent in a sample are masked
    out for that sample. Keys and values have their own maps per modality.
    """

    def __init__(self, dim: int, num_modalities: int, dims: int, proj_drop: float = 0.1,
                 attn_drop: float = 0.0):
        super().__init__()
        self.query_map = DepthWiseConvBlock(dim, dim, dims)
        self.key_maps = nn.ModuleList(DepthWiseConvBlock(dim, dim, dims) for _ in range(num_modalities))
        self.value_maps = nn.ModuleList(DepthWiseConvBlock(dim, dim, dims) for _ in range(num_modalities))
        self.out_project = DepthWiseConvBlock(dim, dim, dims)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: Tensor, feats: Tensor, mask: Tensor) -> Tensor:
        """query [B, C, *S]; feats [B, M, C, *S]; mask [B, M] -> [B, C, *S]."""
        q = self.query_map(query).flatten(2)
        k = torch.cat([km(feats[:, m]).flatten(2) for m, km in enumerate(self.key_maps)], dim=1)
        v = torch.cat([vm(feats[:, m]).flatten(2) for m, vm in enumerate(self.value_maps)], dim=1)
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, C, M*C]
        allowed = mask.repeat_interleave(feats.shape[2], dim=1)[:, None, :]
        attn = self.attn_drop(logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1))
        out = (attn.to(v.dtype) @ v).reshape(query.shape)
        return query + self.proj_drop(self.out_project(out))


class CrossBlock(nn.Module):
    """Reference ``MultiMaskCrossBlock``: masked cross attention, conv FFN on the query and
    (except in the last block) a shared conv FFN on every modality's feature map."""

    def __init__(self, dim: int, num_modalities: int, dims: int, expand: int = 4, drop: float = 0.1,
                 ffn_feature_maps: bool = True):
        super().__init__()
        self.cross_attn = MaskedChannelAttention(dim, num_modalities, dims, proj_drop=drop)
        self.ffn1 = GroupConvBlock(dim, expand, dims)
        self.ffn2 = GroupConvBlock(dim, expand, dims) if ffn_feature_maps else None

    def forward(self, kernels: Tensor, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        kernels = self.ffn1(self.cross_attn(kernels, feats, mask))
        if self.ffn2 is not None:
            feats = self.ffn2(feats.flatten(0, 1)).reshape(feats.shape)
        return kernels, feats


class MultiCrossToken(nn.Sequential):
    """A stack of cross blocks; returns the refined query ("kernels")."""

    def __init__(self, dim: int, num_modalities: int, dims: int, layers: int = 2, expand: int = 4,
                 drop: float = 0.1):
        super().__init__(*[CrossBlock(dim, num_modalities, dims, expand, drop, ffn_feature_maps=i != layers - 1)
                           for i in range(layers)])

    def forward(self, feats: Tensor, kernels: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        for block in self:
            kernels, feats = block(kernels, feats, mask)
        return kernels


class AuxHead(nn.Sequential):
    """Reference ``prm_fusion_pk``: post-norm 1x1 conv to 16 channels, then a 1x1 classifier."""

    def __init__(self, in_ch: int, num_classes: int, dims: int):
        super().__init__(postnorm_block(in_ch, PRM_HIDDEN, 1, 1, dims), conv_cls(dims)(PRM_HIDDEN, num_classes, 1))


class PostFusionBlock(nn.Sequential):
    """Reference ``fusion_postnorm``: (M*w -> w, 1x1), (w, 3x3), (w, 1x1), post-norm.

    As in mmFormer, the reference sizes the input with the number of classes (4); here it is the
    number of modalities (equal in the paper's setting).
    """

    def __init__(self, in_ch: int, width: int, dims: int):
        super().__init__(postnorm_block(in_ch, width, 1, 1, dims), postnorm_block(width, width, 3, 1, dims),
                         postnorm_block(width, width, 1, 1, dims))
        self.num_modalities = in_ch // width

    def forward(self, x: Rows, mask: Tensor) -> Tensor:
        """x: stacked rows [B, M, w, *S] (zeroed here where `mask` is off), then one-modality rows.
        One module call, so activation checkpointing recomputes the block as one unit and keeps
        only its inputs."""
        n = x.num_full
        layers = super().forward
        return x.apply(lambda full: layers(Backbone.zero_unavailable(full, mask[:n]).flatten(1, 2)),
                       self._one_modality)

    def _one_modality(self, x: Tensor, present: Tensor) -> Tensor:
        """The block on stacked features where row p holds only modality present[p] (x: its
        [P, C, ...] channels); only that modality's weight columns of the first conv are used."""
        y = self[0].one_modality(x, present, self.num_modalities)
        for block in list(self)[1:]:
            y = block(y)
        return y


class M2FTransFusionDecoder(nn.Module):
    """Reference ``Decoder_fusion``: cross-token fusion at the 2 coarsest scales, conv fusion below."""

    def __init__(self, width: int, num_modalities: int, num_classes: int, dims: int, cross_layers: int = 2,
                 cross_expand: int = 4, cross_drop: float = 0.1):
        super().__init__()
        widths = [width * 2 ** level for level in range(NUM_SCALES)]
        self.bottom_merge = POSTNORM.concat(2 * widths[4], widths[4], 3, 1, dims)
        self.bottom_out = postnorm_block(widths[4], widths[4], 1, 1, dims)
        self.cross = nn.ModuleList(MultiCrossToken(w, num_modalities, dims, cross_layers, cross_expand, cross_drop)
                                   for w in widths[3:])  # levels 3, 4
        self.conv_fusion = nn.ModuleList(PostFusionBlock(num_modalities * w, w, dims) for w in widths[:3])
        # level l < 4: up_convs[l] maps the upsampled level-(l+1) feature 2w -> w, merge, 1x1 out
        self.up_convs = nn.ModuleList(POSTNORM.upsample(2 * w, w, 3, 1, dims) for w in widths[:-1])
        self.merge = nn.ModuleList(POSTNORM.concat(2 * w, w, 3, 1, dims) for w in widths[:-1])
        self.outs = nn.ModuleList(postnorm_block(w, w, 1, 1, dims) for w in widths[:-1])
        self.aux_heads = nn.ModuleList(AuxHead(w, num_classes, dims) for w in widths)
        self.seg = conv_cls(dims)(width, num_classes, 1)

    def forward(self, feats: Sequence[Tensor | Rows], fusion: Tensor, mask: Tensor) -> FusedOutput:
        """feats: weighted modality features [B, M, C_l, ...] of the 5 levels; fusion [B, 16C, *grid].

        The conv-fused levels 0..2 may be Rows: stacked rows, then rows holding one modality's
        features alone (``mask`` of those rows is its one-hot); all rows are in that order.
        """
        aux = [None] * NUM_SCALES
        dec = [None] * NUM_SCALES  # dec[l]: decoder feature at level l, as the reference returns it
        dims = fusion.dim() - 2
        aux[4] = self.aux_heads[4](fusion)
        x = self.cross[1](feats[4], fusion, mask)
        x = self.bottom_out(self.bottom_merge(x, fusion))
        x = self.up_convs[3](x, feats[3].shape[-dims:])
        for level in reversed(range(NUM_SCALES - 1)):
            dec[level + 1] = x
            aux[level] = self.aux_heads[level](x)
            if level == 3:
                fused = self.cross[0](feats[3], x, mask)
            else:
                fused = self.conv_fusion[level](Rows.of(feats[level]), mask)
            x = self.outs[level](self.merge[level](fused, x))
            if level > 0:
                x = self.up_convs[level - 1](x, Rows.of(feats[level - 1]).spatial)
        dec[0] = x
        return FusedOutput(logits=self.seg(x), aux_logits=aux, decoder_features=dec)


@register_model("m2ftrans")
class M2FTrans(Backbone):
    """M2FTrans behind the backbone contract.

    Features.scales: the 5 per-modality conv scales [B, M, C_l, ...] (zero where absent). The
    masked fusion transformer depends on the mask and therefore runs in ``fuse``.

    Options: mlp_dim (default 32 * 16*base_width = 4096 at width 8), num_heads (8), depth (3),
    dropout (0.1), cross_layers (2), cross_expand (4), cross_dropout (0.1).
    """

    checkpoint_blocks = (EncoderStage, PostFusionBlock, ConvNormAct, TransformerBlock, CrossBlock)
    per_row_blocks = (EncoderStage, PostFusionBlock, ConvNormAct)  # not the attention blocks: dropout

    def __init__(self, num_modalities: int = 4, num_classes: int = 4, base_width: int = 8,
                 patch_size: Sequence[int] = (80, 80, 80), spatial_dims: int = 3, mlp_dim: int | None = None,
                 num_heads: int = 8, depth: int = 3, dropout: float = 0.1, cross_layers: int = 2,
                 cross_expand: int = 4, cross_dropout: float = 0.1):
        super().__init__()
        self.grid = check_config(num_modalities, num_classes, base_width, patch_size, spatial_dims)
        self.num_modalities, self.num_classes, self.spatial_dims = num_modalities, num_classes, spatial_dims
        self.patch_size = tuple(int(p) for p in patch_size)
        dim = 16 * base_width
        self.num_tokens = math.prod(self.grid)
        dims = spatial_dims

        self.encoders = nn.ModuleList(ModalityEncoder(base_width, dims, postnorm_block,
                                                      postnorm_block(1, base_width, 3, 1, dims))
                                      for _ in range(num_modalities))
        self.pos = PositionEmbedding.for_grid(self.grid, dim, copies=num_modalities + 1)
        self.fusion_tokens = nn.Parameter(torch.randn(1, self.num_tokens, dim))
        self.transformer = Transformer(dim, depth, num_heads, int(mlp_dim or 32 * dim), dropout)
        self.decoder_fuse = M2FTransFusionDecoder(base_width, num_modalities, num_classes, dims, cross_layers,
                                                  cross_expand, cross_dropout)
        self.decoder_sep = SeparateDecoder(base_width, num_classes, dims, POSTNORM)
        kaiming_init(self)
        groups = torch.arange(num_modalities + 1).repeat_interleave(self.num_tokens)
        self.register_buffer("token_groups", groups, persistent=False)

    def modality_parameters(self, m: int) -> list[nn.Parameter]:
        """Parameters of modality m's encoder (everything after it is shared and mask-driven)."""
        return list(self.encoders[m].parameters())

    def encode(self, x: Tensor, mask: Tensor) -> Features:
        mask = check_input(x, mask, self.num_modalities, self.patch_size)
        x = self.zero_unavailable(x, mask)
        per_mod = run_per_modality(lambda m, xm: self.encoders[m](xm), x, mask)
        return Features(scales=[torch.stack([f[i] for f in per_mod], dim=1) for i in range(NUM_SCALES)])

    def attention_mask(self, mask: Tensor) -> Tensor:
        """[B, T, T] (T = (M+1)*N, modality-major, fusion tokens last): True where attention is allowed.

        Modality tokens see only their own modality; fusion tokens see the fusion tokens and the
        tokens of the modalities available in that sample.
        """
        groups = self.token_groups.to(mask.device)
        avail = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)[:, groups]  # [B, T]
        same = groups[:, None] == groups[None, :]
        is_fusion = (groups == self.num_modalities)[:, None]
        return same[None] | (is_fusion[None] & avail[:, None, :])

    def fuse(self, features: Features, mask: Tensor) -> FusedOutput:
        mask = to_device(mask, features.scales[0].device, torch.bool)
        scales = [self.zero_unavailable(s, mask) for s in features.scales]
        mod_out, fusion, weights = self._fusion_transformer(scales[-1], mask, [t.shape[3:] for t in scales])
        weighted = [feat * w.to(feat.dtype) for feat, w in zip(scales[:-1] + [mod_out], weights)]
        return self.decoder_fuse(weighted, fusion, mask)

    def fuse_single(self, features: Features, b_idx: Tensor, m_idx: Tensor) -> FusedOutput:
        """One-hot fusion: equal to ``fuse`` with one-hot masks (up to float rounding), but the
        conv-fused levels 0..2 carry only the present modality's features (the absent ones are
        zero there and only reach the first 1^3 conv). The transformer and the cross-token levels
        3..4 see all modalities, as in ``fuse``."""
        return self._fuse_rows(features, None, b_idx, m_idx)

    def fuse_teacher_and_singles(self, features: Features, mask: Tensor, b_idx: Tensor,
                                 m_idx: Tensor) -> tuple[FusedOutput, FusedOutput]:
        """``fuse`` and ``fuse_single`` as ONE transformer and decoder pass over B + P rows."""
        return self._fuse_rows(features, mask, b_idx, m_idx).split(features.batch_size)

    def _fuse_rows(self, features: Features, mask: Tensor | None, b_idx: Tensor, m_idx: Tensor) -> FusedOutput:
        """Rows of ``fuse`` under `mask` (none if None), then rows of ``fuse_single``'s pairs."""
        device = features.scales[0].device
        b_idx, m_idx = to_device(b_idx, device), to_device(m_idx, device)
        onehot = nn.functional.one_hot(m_idx, self.num_modalities).bool()
        scales = [s.index_select(0, b_idx) for s in features.scales[3:]]
        masks = onehot
        if mask is not None:
            mask = to_device(mask, device, torch.bool)
            full = [self.zero_unavailable(s, mask) for s in features.scales]
            masks = torch.cat((mask, onehot))
            scales = [torch.cat((f, s)) for f, s in zip(full[3:], scales)]
        level3, bottom = (self.zero_unavailable(s, masks) for s in scales)
        mod_out, fusion, weights = self._fusion_transformer(bottom, masks, [t.shape[3:] for t in features.scales])
        n = 0 if mask is None else mask.shape[0]
        rows = torch.arange(n, n + m_idx.numel(), device=device)
        weighted = []
        pairs = features.pair_scales(b_idx, m_idx)
        for level in range(3):
            feat = features.scales[level]
            one = pairs[level] * weights[level][rows, m_idx].to(feat.dtype)
            stacked = None if mask is None else full[level] * weights[level][:n].to(feat.dtype)
            weighted.append(Rows(stacked, one, m_idx))
        weighted += [level3 * weights[3].to(level3.dtype), mod_out * weights[4].to(mod_out.dtype)]
        return self.decoder_fuse(weighted, fusion, masks)

    def _fusion_transformer(self, bottom: Tensor, mask: Tensor,
                            sizes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Masked bottleneck features [B, M, D, *grid] -> (refined modality features, fusion
        feature [B, D, *grid], per-level modality weights [B, M, 1, *S_l], finest first); sizes:
        the spatial size S_l of every level."""
        batch, mods, dim = bottom.shape[:3]
        n = self.num_tokens
        tokens = bottom.flatten(3).transpose(2, 3).reshape(batch, mods * n, dim)
        tokens = torch.cat((tokens, self.fusion_tokens.expand(batch, -1, -1).to(tokens.dtype)), dim=1)
        out, attn = self.transformer(tokens + self.pos(), mask=self.attention_mask(mask), return_attention=True)
        mod_out = out[:, :mods * n].reshape(batch, mods, n, dim).transpose(2, 3).reshape(bottom.shape)
        fusion = tokens_to_grid(out[:, mods * n:], self.grid)

        # modality weights: first block's attention of fusion queries on each modality's tokens
        first = attn[0].detach()[:, :, mods * n:, :mods * n]  # [B, heads, N, M*N]
        weight = first.sum(dim=(1, 2)).reshape(batch * mods, 1, *self.grid)
        weights = []
        for level in reversed(range(NUM_SCALES)):
            if level < NUM_SCALES - 1:
                weight = F.interpolate(weight, size=tuple(sizes[level]), mode="nearest")
            weights.append(weight.reshape(batch, mods, 1, *weight.shape[2:]))
        return mod_out, fusion, weights[::-1]

    def decode_single(self, features: Features, mask: Tensor | None = None) -> Tensor:
        return decode_available(self.decoder_sep, features, mask, self.num_classes)
