"""Sliding-window prediction for many modality subsets at once.

Evaluating the 2^M - 1 subsets of a case naively runs the whole network 15 times. The model
contract (models/interface.py) lets us do better: per-modality encoder features do not depend
on which *other* modalities are present, and ``fuse`` zeroes the features of modalities that
are off in its mask. So for every window we run ``encode`` once with the case's available
modalities, repeat the features once per requested subset and run ONE batched ``fuse`` over
an [S, M] mask (single-modality subsets go through ``fuse_single``, the backbone's one-hot
fusion). MONAI's ``sliding_window_inference`` then averages the S softmax maps over
overlapping windows (mode ``constant`` = plain mean) exactly as for a single subset.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.interface import to_device
from ..utils import PassionError
from .runtime import (PRECISIONS, autocast, configure_host, resolve_device,  # noqa: F401  (re-exported)
                      warn_if_slow_precision)

# subsets per fusion call. RFNet (width 8), one 80^3 window, 15 subsets, 2 CPU threads: batch 15
# 88 s and 7.0 GB peak, batch 5 80 s and 2.9 GB, batch 1 119 s and 1.2 GB (naive 15 forwards 167 s)
DEFAULT_FUSE_BATCH = 5


def inference_precision(explicit: str | None, configured: str, device: torch.device) -> str:
    """The explicit choice wins; a training precision of fp16 becomes fp32 on a CPU (no fp16 there)."""
    if explicit:
        return explicit
    if configured == "fp16" and device.type != "cuda":
        return "fp32"
    return configured or "fp32"


def _mask_tensor(masks, num_modalities: int) -> Tensor:
    t = torch.as_tensor(np.asarray(masks, dtype=bool))
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != num_modalities:
        raise ValueError(f"subset masks must be [S, {num_modalities}], got {tuple(t.shape)}")
    if not bool(t.any(dim=1).all()):
        raise ValueError("every subset must contain at least one modality")
    return t


class SubsetPredictor:
    """Window predictor for ``sliding_window_inference``: [B, M, *roi] -> [B, S*C, *roi] softmax.

    encode runs once per window batch with ``encode_mask`` (the modalities the case really
    has); fuse runs over the features repeated for the subsets, ``fuse_batch`` subsets per call
    (None: all S in one call). Batching the fusion costs memory roughly proportional to the
    number of subsets per call, while the encoder work is saved whatever the batch.
    """

    def __init__(self, model, subsets, encode_mask=None, precision: str = "fp32", fuse_batch: int | None = None):
        self.model = model
        self.fuse_batch = int(fuse_batch) if fuse_batch else None
        m = model.num_modalities
        self.subsets = _mask_tensor(subsets, m)
        enc = torch.ones(m, dtype=torch.bool) if encode_mask is None else torch.as_tensor(
            np.asarray(encode_mask, dtype=bool))
        if enc.shape != (m,):
            raise ValueError(f"encode mask must have {m} entries, got {tuple(enc.shape)}")
        outside = self.subsets & ~enc
        if bool(outside.any()):
            raise PassionError("a requested subset uses a modality the case does not have")
        self.encode_mask = enc
        self.precision = precision

    @torch.no_grad()
    def __call__(self, window: Tensor) -> Tensor:
        b = window.shape[0]
        s = self.subsets.shape[0]
        dev = window.device
        step = self.fuse_batch or s
        single = self.subsets.sum(dim=1) == 1
        parts = []  # (subset indices, probabilities [b, k, C, ...])
        with autocast(dev, self.precision):
            enc_mask = self.encode_mask[None].expand(b, -1)  # on the host (interface.host_mask)
            feats = self.model.encode(window, enc_mask)
            # single-modality subsets: the backbone's one-hot fusion (cheaper where it has one)
            singles = single.nonzero().squeeze(1)
            for start in range(0, singles.numel(), step):
                idx = singles[start:start + step]
                mods = to_device(self.subsets[idx].float().argmax(dim=1), dev)
                k = idx.numel()
                b_idx = torch.arange(b, device=dev).repeat_interleave(k)  # b0s0, b0s1, ...
                logits = self.model.fuse_single(feats, b_idx, mods.repeat(b)).logits
                parts.append((idx, self._probs(logits, b, k)))
            multi = (~single).nonzero().squeeze(1)
            for start in range(0, multi.numel(), step):
                idx = multi[start:start + step]
                k = idx.numel()
                f = feats.repeat_each(k) if k > 1 else feats
                mask = self.subsets[idx].repeat(b, 1)  # on the host; order matches repeat_each: b0s0, b0s1, ...
                logits = self.model.fuse(f, mask).logits
                parts.append((idx, self._probs(logits, b, k)))
                del f, logits
        probs = parts[0][1].new_empty((b, s) + parts[0][1].shape[2:])
        for idx, p in parts:
            probs[:, to_device(idx, dev)] = p
        return probs.reshape(b, s * probs.shape[2], *probs.shape[3:])

    @staticmethod
    def _probs(logits: Tensor, b: int, k: int) -> Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        return probs.reshape(b, k, *probs.shape[1:])


class NaivePredictor:
    """One full forward per subset (the reference behaviour; used for checks and benchmarks)."""

    def __init__(self, model, subsets, precision: str = "fp32"):
        self.model = model
        self.subsets = _mask_tensor(subsets, model.num_modalities)
        self.precision = precision

    @torch.no_grad()
    def __call__(self, window: Tensor) -> Tensor:
        b = window.shape[0]
        outs = []
        with autocast(window.device, self.precision):
            for mask in self.subsets:  # on the host (interface.host_mask)
                logits = self.model(window, mask[None].expand(b, -1))
                outs.append(torch.softmax(logits.float(), dim=1))
        return torch.cat(outs, dim=1)


@torch.no_grad()
def predict_subsets(model, image, subsets, *, roi_size: Sequence[int], available=None, overlap: float = 0.5,
                    sw_batch_size: int = 1, device: str | torch.device | None = "cpu", precision: str = "fp32",
                    subset_chunk: int | None = None, fuse_batch: int | None = DEFAULT_FUSE_BATCH,
                    reuse_features: bool = True, output_device: str | torch.device = "cpu") -> Tensor:
    """Mean-softmax probabilities [S, C, *spatial] (float32) of one volume for each subset.

    image: [M, *spatial] (numpy or tensor); subsets: [S, M] masks; a 2D roi on a 3D image predicts
    slice by slice along the last axis (2D datasets' slice stacks); available: the modalities
    the volume really has (default: all); their channels are zeroed in encode for the rest.
    Memory: ``fuse_batch`` subsets share one fusion call inside a window (encoder features are
    still computed once per window); ``subset_chunk`` additionally splits the subsets into
    separate sliding-window passes (smaller output buffer, but the encoder runs once per chunk).
    """
    from monai.inferers import sliding_window_inference

    dev = resolve_device(device)
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
    x = x.float()[None].to(dev)
    m = x.shape[1]
    masks = _mask_tensor(subsets, m)
    if available is None:
        available = [True] * m
    # modalities that are absent in the case are zero in the input, as in training
    x = x * torch.as_tensor(np.asarray(available, dtype=np.float32), device=dev).reshape(1, m, *[1] * (x.dim() - 2))
    # a 2D model on a slice stack [M, H, W, S] (2D datasets): the slices become the batch
    slicewise = len(roi_size) == x.dim() - 3
    if slicewise:
        x = x[0].movedim(-1, 0)
    chunk = masks.shape[0] if not subset_chunk else max(1, int(subset_chunk))
    model = model.to(dev).eval()
    outs = []
    for start in range(0, masks.shape[0], chunk):
        part = masks[start:start + chunk]
        if reuse_features:
            predictor = SubsetPredictor(model, part, encode_mask=available, precision=precision,
                                        fuse_batch=fuse_batch)
        else:
            predictor = NaivePredictor(model, part, precision=precision)
        probs = sliding_window_inference(x, roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                         predictor=predictor, overlap=overlap, mode="constant",
                                         device=torch.device(output_device))
        if slicewise:
            probs = probs.movedim(0, -1)[None]
        probs = probs[0].reshape(part.shape[0], -1, *probs.shape[2:]).float()
        outs.append(probs)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def predict_classes(model, image, subsets, **kw) -> np.ndarray:
    """Argmax class maps [S, *spatial] (uint8) for each subset; see predict_subsets."""
    probs = predict_subsets(model, image, subsets, **kw)
    return probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
