"""Transformer pieces shared by mmFormer and M2FTrans.

Both references use the same ViT-style pre-norm block: ``x + Drop(Attn(LN(x)))`` followed by
``x + MLP(LN(x))``, with dropout on the attention weights, on the attention projection and once
more around the attention branch (the reference's ``PreNormDrop``), GELU in the MLP and no bias
in the qkv projection. Attention is written out (not ``scaled_dot_product_attention``) because
M2FTrans reads the attention weights of the first layer back to weight its skip features.

Masks are per sample: ``mask`` is either a key mask [B, N] (True = the key may be attended) or a
full mask [B, N, N] (query x key, True = allowed); heads share it. This is what lets a batch whose
samples carry different modality subsets run in one call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_grid(patch_size: Sequence[int], stride: int = 16) -> tuple[int, ...]:
    """The bottleneck token grid of a patch (the encoders downsample by `stride`).

    Reflect padding needs at least 2 voxels per axis at the coarsest scale, hence the lower bound.
    """
    patch = tuple(int(p) for p in patch_size)
    bad = [p for p in patch if p % stride or p < 2 * stride]
    if bad:
        raise ValueError(f"patch_size {patch} must be a multiple of {stride} and at least {2 * stride} "
                         f"along every axis (the bottleneck is patch/{stride} with reflect padding)")
    return tuple(p // stride for p in patch)


def grid_to_tokens(x: Tensor) -> Tensor:
    """[B, C, *grid] -> [B, N, C] with N = prod(grid), row-major over the grid."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(t: Tensor, grid: Sequence[int]) -> Tensor:
    """[B, N, C] -> [B, C, *grid]; the inverse of `grid_to_tokens`."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


class PositionEmbedding(nn.Module):
    """Learnable position embedding [1, num_tokens, dim] (zero-initialised as in both references)."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))

    @classmethod
    def for_grid(cls, grid: Sequence[int], dim: int, copies: int = 1) -> "PositionEmbedding":
        return cls(copies * math.prod(grid), dim)

    def forward(self) -> Tensor:
        return self.weight


class Attention(nn.Module):
    """Multi-head self-attention with an optional per-sample mask."""

    def __init__(self, dim: int, heads: int = 8, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (output [B, N, dim], attention weights [B, heads, N, N] after dropout)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            allowed = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out)), attn


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Drop(Attn(LN x)); x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x), mask)
        x = x + self.drop(y)
        return x + self.mlp(self.norm2(x)), attn


class Transformer(nn.Module):
    """A stack of pre-norm blocks.

    If `pos` is given it is added before every block (mmFormer adds it per layer; with its depth
    of 1 that is once). M2FTrans adds its embedding once beforehand and passes ``pos=None``.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_dim, dropout) for _ in range(depth))

    def forward(self, x: Tensor, pos: Tensor | None = None, mask: Tensor | None = None,
                return_attention: bool = False):
        weights = []
        for block in self.blocks:
            if pos is not None:
                x = x + pos
            x, attn = block(x, mask)
            weights.append(attn)
        return (x, weights) if return_attention else x
