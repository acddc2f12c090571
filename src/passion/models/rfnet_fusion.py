"""RFNet's region-aware fusion (Ding et al., ICCV 2021): the region-prior generator (PRM) and
the region-aware modality fusion (RFM) run at every scale of the fusion decoder (rfnet.py).

Both take stacked-modality rows and, for PASSION's one-hot passes, one-modality rows (rows.py);
only their first modality-mixing layers differ between the two kinds of rows.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import conv_cls, postnorm_block
from .rows import Rows


class RegionPriorGenerator(nn.Module):
    """Region-prior (PRM) head: region logits from the masked modality features.

    The reference ``prm_generator_pk`` / ``prm_generator_laststage_pk`` (PASSION variant,
    logits out). At the bottleneck (``last_stage``) it sees only the modality features; at
    finer scales it also sees the decoder feature from the coarser scale.
    """

    def __init__(self, channels: int, num_modalities: int, num_classes: int, dims: int,
                 last_stage: bool, hidden: int = 16):
        super().__init__()
        self.last_stage = last_stage
        self.num_modalities = num_modalities
        self.embed = nn.Sequential(
            postnorm_block(num_modalities * channels, channels // 4, kernel=1, dims=dims),
            postnorm_block(channels // 4, channels // 4, dims=dims),
            postnorm_block(channels // 4, channels, kernel=1, dims=dims))
        self.head = nn.Sequential(
            postnorm_block(channels * (1 if last_stage else 2), hidden, kernel=1, dims=dims),
            conv_cls(dims)(hidden, num_classes, 1))

    def forward(self, modal: Tensor | Rows, decoder_feat: Tensor | None) -> Tensor:
        """modal: masked features [B, M, C, *S], or Rows that may also hold one-modality rows."""
        first = Rows.of(modal).apply(
            lambda full: self.embed[0](full.flatten(1, 2)),
            lambda one, present: self.embed[0].one_modality(one, present, self.num_modalities))
        emb = self.embed[1:](first)
        if not self.last_stage:
            emb = torch.cat((decoder_feat, emb), dim=1)
        return self.head(emb)


class RegionAwareFusion(nn.Module):
    """Region-aware modality fusion (reference ``region_aware_modal_fusion``).

    For region r with prior p_r (a softmax probability map) every modality feature is
    masked as y_k * p_r; a per-region MLP maps [region-pooled features of all modalities,
    mean(p_r)] to one sigmoid weight per modality; the region feature is the weighted sum
    over modalities. Regions are merged by convs and concatenated with a shortcut that fuses
    the raw (masked) modality features. Output channels = input channels.
    The region-pooled feature is mean(y_k * p_r) / (mean(p_r) + 1e-7), as the reference.
    It is computed with one contraction instead of materialising [B, M, R, C, *S].
    """

    def __init__(self, channels: int, num_modalities: int, num_regions: int, dims: int, hidden: int = 128):
        super().__init__()
        conv = conv_cls(dims)
        self.dims = dims
        self.num_modalities = num_modalities
        self.weight_mlps = nn.ModuleList(
            nn.Sequential(conv(num_modalities * channels + 1, hidden, 1), nn.LeakyReLU(0.2, inplace=True),
                          conv(hidden, num_modalities, 1))
            for _ in range(num_regions))
        self.region_merge = nn.Sequential(
            postnorm_block(num_regions * channels, channels, kernel=1, dims=dims),
            postnorm_block(channels, channels, dims=dims),
            postnorm_block(channels, channels // 2, kernel=1, dims=dims))
        self.shortcut = nn.Sequential(
            postnorm_block(num_modalities * channels, channels, kernel=1, dims=dims),
            postnorm_block(channels, channels, dims=dims),
            postnorm_block(channels, channels // 2, kernel=1, dims=dims))

    def forward(self, y: Tensor | Rows, prior: Tensor) -> Tensor:
        """y: masked features [B, M, C, *S], or Rows that may also hold one-modality rows;
        prior: region probabilities [rows, R, *S] (detached)."""
        y = Rows.of(y)
        n = y.num_full
        regions, short = y.apply(lambda full: self._regions_full(full, prior[:n]),
                                 lambda one, present: self._regions_one_modality(one, prior[n:], present))
        return torch.cat((self.region_merge(regions), self.shortcut[1:](short)), dim=1)

    def _regions_full(self, y: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
        """(region features [B, R*C, *S], first shortcut conv) of stacked features y [B, M, C, *S]."""
        b, m, c = y.shape[:3]
        spatial = y.shape[3:]
        r = prior.shape[1]
        yf = y.reshape(b, m, c, -1)
        pf = prior.reshape(b, r, -1).to(yf.dtype)
        n = yf.shape[-1]
        prior_mean = pf.mean(dim=-1) + 1e-7                               # [B, R]
        pooled = torch.einsum("bmcn,brn->brmc", yf, pf) / n               # mean(y_k * p_r)
        pooled = pooled / prior_mean[:, :, None, None]
        region_feats = []
        for i in range(r):
            weight = self._modality_weights(i, pooled[:, i], prior_mean[:, i:i + 1])
            fused = torch.einsum("bm,bmcn->bcn", weight.to(yf.dtype), yf) * pf[:, i:i + 1]
            region_feats.append(fused)
        regions = torch.stack(region_feats, dim=1).reshape(b, r * c, *spatial)
        return regions, self.shortcut[0](y.reshape(b, m * c, *spatial))

    def _modality_weights(self, region: int, pooled: Tensor, prior_mean: Tensor) -> Tensor:
        """[B, M] sigmoid weights from region-pooled features [B, M, C] and mean prior [B, 1]."""
        b, m, c = pooled.shape
        vec = torch.cat((pooled.reshape(b, m * c), prior_mean), dim=1)
        unit = (1,) * self.dims
        return torch.sigmoid(self.weight_mlps[region](vec.reshape(b, m * c + 1, *unit)).reshape(b, m))

    def _regions_one_modality(self, y: Tensor, prior: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """The same when row p has only modality present[p]: y is [P, C, *S].

        The sums over modalities then have a single non-zero term, so pooled features are
        computed for that modality alone and the region feature is its weight times its feature.
        """
        p, c = y.shape[:2]
        spatial = y.shape[2:]
        r = prior.shape[1]
        yf = y.reshape(p, c, -1)
        pf = prior.reshape(p, r, -1).to(yf.dtype)
        n = yf.shape[-1]
        prior_mean = pf.mean(dim=-1) + 1e-7                               # [P, R]
        pooled_one = torch.einsum("pcn,prn->prc", yf, pf) / n / prior_mean[:, :, None]
        onehot = nn.functional.one_hot(present, self.num_modalities).to(pooled_one.dtype)  # [P, M]
        pooled = pooled_one[:, :, None, :] * onehot[:, None, :, None]     # [P, R, M, C], zeros elsewhere
        region_feats = []
        for i in range(r):
            weight = self._modality_weights(i, pooled[:, i], prior_mean[:, i:i + 1])
            w_present = weight.gather(1, present[:, None]).to(yf.dtype)  # [P, 1]
            region_feats.append(w_present[:, :, None] * yf * pf[:, i:i + 1])
        regions = torch.stack(region_feats, dim=1).reshape(p, r * c, *spatial)
        return regions, self.shortcut[0].one_modality(y, present, self.num_modalities)
