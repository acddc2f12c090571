"""An oracle backbone whose prediction is written in its input, and runs that use it.

The class of a voxel is the largest value over the available modalities, rounded and clipped to
the class range. Evaluating a cache whose images hold the reference classes therefore predicts
the reference exactly (in every subset); images holding shifted classes predict a known offset;
a raw NIfTI with a small bright structure on a uniform brain is z-scored to far above the top
class there and below 0.5 elsewhere, so `predict` must return that structure at those voxels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from passion.config import Config
from passion.data.cache import write_case, write_index
from passion.engine.checkpoint import save_checkpoint
from passion.models import register_model
from passion.models.interface import Backbone, Features, FusedOutput

ORACLE = "_oracle_test"


@register_model(ORACLE)
class OracleNet(Backbone):
    def __init__(self, num_modalities=4, num_classes=4, base_width=4, patch_size=(16, 16, 16), spatial_dims=3):
        super().__init__()
        self.num_modalities, self.num_classes = num_modalities, num_classes
        self.scale = torch.nn.Parameter(torch.tensor(20.0))  # a state_dict to save and load

    def encode(self, x, mask):
        return Features([self.zero_unavailable(x, mask)[:, :, None]])  # [B, M, 1, *S]

    def _logits(self, values):  # values [B, 1, *S] -> peaked logits at round(clip(values))
        classes = torch.arange(self.num_classes, dtype=values.dtype, device=values.device)
        target = values.clamp(0, self.num_classes - 1).round()
        shape = (1, -1) + (1,) * (values.dim() - 2)
        return -self.scale * (target - classes.reshape(shape)) ** 2

    def fuse(self, features, mask):
        x = self.zero_unavailable(features.scales[0], mask.to(features.scales[0].device))
        return FusedOutput(self._logits(x.amax(dim=1)), [], [x.amax(dim=1)])

    def decode_single(self, features, mask=None):
        x = features.scales[0]
        return torch.stack([self._logits(x[:, m]) for m in range(x.shape[1])], 1)


def oracle_checkpoint(root: Path, spec, patch: list[int], cache: Path | None = None,
                      split: Path | None = None) -> Path:
    """RUN/checkpoints/last.pt of an oracle run over `cache` (its index gives predict's crop minimum)."""
    run = root / "run"
    cfg = Config(run_dir=str(run))
    cfg.data.cache = str(cache) if cache else ""
    cfg.data.split = str(split) if split else ""
    cfg.model.name, cfg.model.patch_size = ORACLE, list(patch)
    cfg.train.device, cfg.train.threads = "cpu", 1
    model = OracleNet(spec.num_modalities, spec.num_classes)
    path = run / "checkpoints" / "last.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "config_hash": cfg.hash(), "spec": spec.to_dict(),
                           "model": model.state_dict(), "epoch": 1, "iteration": 1})
    return path


def write_class_cache(root: Path, spec, cases: dict[str, tuple[np.ndarray, np.ndarray]], spacing,
                      min_size: int = 16) -> Path:
    """A cache whose images are the given class maps in every modality, with the given labels."""
    cache = root / "cache"
    entries = []
    for name, (predicted, label) in cases.items():
        image = np.repeat(predicted[None].astype(np.float32), spec.num_modalities, axis=0)
        meta = {"name": name, "available": [True] * spec.num_modalities, "spacing": list(spacing),
                "original_shape": list(label.shape), "crop_box": [[0, s] for s in label.shape],
                "affine": np.diag([*spacing, 1.0][-4:]).tolist(), "files": {}}
        write_case(cache, name, image, label.astype(np.uint8), meta)
        entries.append({"name": name, "available": [True] * spec.num_modalities, "shape": list(label.shape)})
    write_index(cache, spec, entries, {"min_size": min_size})
    return cache


def write_split(root: Path, names) -> Path:
    split = root / "split"
    split.mkdir(parents=True, exist_ok=True)
    (split / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return split
