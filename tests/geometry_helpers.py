"""Phantoms defined in world space and checkpoints with a recorded training grid, for the
spacing, orientation and alias tests.

A phantom is a uniform brain (100) holding a bright asymmetric L (1000), both given as boxes in mm,
so it can be written on any grid: a voxel belongs to a box when its centre lies inside.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from passion.config import Config
from passion.data.spec import get_spec
from passion.engine.checkpoint import build_model_for, save_checkpoint
from passion.models import register_model
from passion.models.interface import Backbone, Features, FusedOutput

import oracle  # noqa: F401  (registers the oracle backbone)

BRATS = get_spec("brats2020")
CONV = "_geometry_conv_test"
BRAIN_MM = ((4.0, 36.0), (6.0, 34.0), (4.0, 30.0))
L_MM = (((10.0, 20.0), (12.0, 26.0), (8.0, 14.0)),  # the foot
        ((10.0, 14.0), (12.0, 16.0), (14.0, 24.0)))  # the leg


@register_model(CONV)
class ConvNet(Backbone):
    """Random 3x3x3 convolutions: unlike the pointwise oracle, a flipped input gives a different
    prediction unless predict brings it back into the training orientation."""

    def __init__(self, num_modalities=4, num_classes=4, base_width=4, patch_size=(16, 16, 16), spatial_dims=3):
        super().__init__()
        self.num_modalities, self.num_classes = num_modalities, num_classes
        self.enc = nn.ModuleList(nn.Conv3d(1, base_width, 3, padding=1) for _ in range(num_modalities))
        self.head = nn.Conv3d(base_width, num_classes, 3, padding=1)

    def encode(self, x, mask):
        x = self.zero_unavailable(x, mask)
        f = torch.stack([F.leaky_relu(e(x[:, m:m + 1]), 0.2) for m, e in enumerate(self.enc)], 1)
        return Features([self.zero_unavailable(f, mask)])

    def fuse(self, features, mask):
        n = mask.sum(1).clamp(min=1).float().reshape(-1, 1, 1, 1, 1).to(features.scales[0].device)
        g = self.zero_unavailable(features.scales[0], mask.to(features.scales[0].device)).sum(1) / n
        return FusedOutput(self.head(g) * 5.0, [], [g])

    def decode_single(self, features, mask=None):
        return torch.stack([self.head(features.scales[0][:, m]) for m in range(self.num_modalities)], 1)


def checkpoint(root: Path, model: str = CONV, spacing=None, orientation=None, spec=BRATS, min_size: int = 16,
               patch=(16, 16, 16)) -> Path:
    """RUN/checkpoints/last.pt recording the training grid (None: a checkpoint from before grids)."""
    run = root / "run"
    cfg = Config(run_dir=str(run))
    cfg.model.name, cfg.model.patch_size, cfg.model.base_width = model, list(patch), 4
    cfg.train.device, cfg.train.threads = "cpu", 1
    torch.manual_seed(0)
    net = build_model_for(cfg, spec)
    payload = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "spec": spec.to_dict(),
               "model": net.state_dict(), "epoch": 1, "iteration": 1}
    if spacing is not None or orientation is not None:
        payload["preprocess"] = {"min_size": min_size, "spacing": spacing, "orientation": orientation}
    path = run / "checkpoints" / "last.pt"
    save_checkpoint(path, payload)
    return path


def in_boxes(shape, affine, boxes) -> np.ndarray:
    """Voxels of a grid whose centres lie inside any of the world boxes [(lo, hi) per axis]."""
    idx = np.indices(shape).reshape(3, -1)
    world = (np.asarray(affine)[:3, :3] @ idx + np.asarray(affine)[:3, 3:4])
    inside = np.zeros(idx.shape[1], bool)
    for box in boxes:
        inside |= np.all([(world[a] > lo) & (world[a] < hi) for a, (lo, hi) in enumerate(box)], axis=0)
    return inside.reshape(shape)


def phantom(shape, affine) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"flair", "t2"} volumes, structure mask) of the world phantom on a grid."""
    brain = in_boxes(shape, affine, [BRAIN_MM])
    structure = in_boxes(shape, affine, L_MM)
    flair = np.where(structure, 1000.0, np.where(brain, 100.0, 0.0)).astype(np.float32)
    return {"flair": flair, "t2": 0.5 * flair}, structure  # one z-score: the oracle's max over both is flair's


def write_case(root: Path, name: str, volumes: dict[str, np.ndarray], affine, sep: str = "_") -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for suffix, data in volumes.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, np.float64)),
                 str(d / f"{name}{sep}{suffix}.nii.gz"))
    return d


def grid_affine(spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.diag([*map(float, spacing), 1.0])
    a[:3, 3] = origin
    return a
