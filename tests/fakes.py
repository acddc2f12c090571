"""A tiny fake backbone implementing the model contract, for objective tests.

Per-modality two-scale conv encoders, a fusion decoder that averages the features of the
modalities on in *its* mask (per sample), an auxiliary head at half resolution, and a
shared single-modality decoder. Small enough that a training step takes milliseconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passion.models.interface import Backbone, Features, FusedOutput


def _conv(dims: int):
    return nn.Conv3d if dims == 3 else nn.Conv2d


class _Encoder(nn.Module):
    def __init__(self, width: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        self.c1 = conv(1, width, 3, padding=1)
        self.c2 = conv(width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = F.leaky_relu(self.c1(x), 0.2)
        return [f1, F.leaky_relu(self.c2(f1), 0.2)]


class _Decoder(nn.Module):
    """Coarse -> up -> concat fine -> conv (decoder feature g^1) -> logits; aux logits from coarse."""

    def __init__(self, width: int, num_classes: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        self.dims = dims
        self.mix = conv(3 * width, width, 3, padding=1)
        self.head = conv(width, num_classes, 1)
        self.aux = conv(2 * width, num_classes, 1)

    def forward(self, f1: Tensor, f2: Tensor) -> FusedOutput:
        mode = "trilinear" if self.dims == 3 else "bilinear"
        up = F.interpolate(f2, size=f1.shape[2:], mode=mode, align_corners=True)
        g1 = F.leaky_relu(self.mix(torch.cat([f1, up], dim=1)), 0.2)
        return FusedOutput(self.head(g1), [self.aux(f2)], [g1, f2])


class FakeBackbone(Backbone):
    def __init__(self, num_modalities: int = 3, num_classes: int = 3, width: int = 4, dims: int = 3):
        super().__init__()
        self.num_modalities, self.num_classes, self.spatial_dims = num_modalities, num_classes, dims
        self.encoders = nn.ModuleList(_Encoder(width, dims) for _ in range(num_modalities))
        self.fusion = _Decoder(width, num_classes, dims)
        self.single = _Decoder(width, num_classes, dims)
        self.fuse_calls = 0
        self.encode_calls = 0

    def encode(self, x: Tensor, mask: Tensor) -> Features:
        self.encode_calls += 1
        x = self.zero_unavailable(x, mask)
        per_mod = [enc(x[:, m:m + 1]) for m, enc in enumerate(self.encoders)]
        scales = [torch.stack([f[s] for f in per_mod], dim=1) for s in range(2)]
        return Features([self.zero_unavailable(t, mask) for t in scales])

    def fuse(self, features: Features, mask: Tensor) -> FusedOutput:
        self.fuse_calls += 1
        mask = mask.to(device=features.scales[0].device, dtype=torch.bool)
        count = mask.sum(dim=1).clamp_min(1).float()
        fused = []
        for t in features.scales:
            z = self.zero_unavailable(t, mask).sum(dim=1)
            fused.append(z / count.reshape((-1,) + (1,) * (z.dim() - 1)))
        return self.fusion(*fused)

    def decode_single(self, features: Features, mask: Tensor | None = None) -> Tensor:
        b, m = features.scales[0].shape[:2]
        flat = [t.flatten(0, 1) for t in features.scales]
        logits = self.single(*flat).logits
        return logits.reshape((b, m) + logits.shape[1:])


def random_batch(batch: int = 2, modalities: int = 3, classes: int = 3, size: int = 8,
                 dims: int = 3, seed: int = 0, mask: list[list[bool]] | None = None) -> dict:
    """Noisy views of one random field, its bucketised classes (each present in every sample), a mask."""
    g = torch.Generator().manual_seed(seed)
    spatial = (size,) * dims
    shared = torch.randn((batch, 1) + spatial, generator=g)  # the "anatomy" all modalities see
    image = shared + 0.5 * torch.randn((batch, modalities) + spatial, generator=g)
    bounds = torch.linspace(-0.5, 0.5, classes - 1) if classes > 2 else torch.zeros(1)
    target = torch.bucketize(shared[:, 0].contiguous(), bounds)  # learnable from any modality
    for c in range(classes):  # guarantee presence
        target[(slice(None),) + (c,) * dims] = c
    if mask is None:
        mask = [[True] * modalities for _ in range(batch)]
    return {"image": image, "target": target, "mask": torch.tensor(mask, dtype=torch.bool)}
