"""Checkpoints: atomic save, safe load (weights_only=True), and model reconstruction.

A checkpoint is a plain dict of tensors and JSON-like values, so it loads with
``torch.load(weights_only=True)`` and never unpickles arbitrary objects:

    {"format": "passion-checkpoint", "version": 1,
     "config": Config.to_dict(), "config_hash": str, "spec": DatasetSpec.to_dict(),
     "model": state_dict, "epoch": int (epochs completed), "iteration": int (global step),
     "optimizer": ..., "scheduler": ..., "objective": ..., "rng": ..., "scaler": ...,
     "best": {"val_score": float, "epoch": int (0-based, as in metrics.jsonl), "step": int} or None,
     "preprocess": {"min_size", "spacing": [mm x3] or None, "orientation": "LPS" or None},
     "epoch_means": running sums of the epoch in progress (engine/epoch_means.py)}

"preprocess" is the training cache's grid and crop (data/cache.py preprocess_record), which `predict`
repeats; checkpoints without it fall back to the config's cache, then to each input's native grid.

`last.pt` is the newest state; `best.pt` the state with the highest validation score so far (their paths:
run_dir.py). `load_for_inference` is where evaluate and predict start: a run's model ready to predict.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_from_dict
from ..data.spec import DatasetSpec
from ..run_dir import RunDir
from ..utils import PassionError, atomic_path

FORMAT = "passion-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise PassionError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise PassionError(f"{path}: not a PyTorch checkpoint file (expected a file written by `passion train`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise PassionError(f"{path}: holds pickled Python objects that a safe load refuses; it was not written "
                           f"by `passion train`") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassionError(f"{path}: not a readable passion checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PassionError(f"{path}: not a passion checkpoint (no '{FORMAT}' marker)")
    return ckpt


def preprocess_of(ckpt: dict) -> dict:
    """The preprocessing record of a checkpoint, else of its config's cache (older checkpoints);
    keys the record lacks are None."""
    from ..data.cache import preprocess_record, read_index

    record = dict(ckpt.get("preprocess") or {})
    if not record:
        cache = (ckpt.get("config") or {}).get("data", {}).get("cache")
        try:
            record = preprocess_record(read_index(cache)) if cache else {}
        except (PassionError, OSError):
            record = {}
    return {"min_size": record.get("min_size"), "spacing": record.get("spacing"),
            "orientation": record.get("orientation")}


def resolve_checkpoint(run_or_ckpt: str | Path, which: str = "last") -> Path:
    """`which` is 'last', 'best', an epoch number, or a path; run_or_ckpt a run dir or a file."""
    p = Path(run_or_ckpt)
    if p.is_file():
        return p
    if which and Path(which).is_file():
        return Path(which)
    run = RunDir(p)
    cand = run.checkpoint(which)
    if not cand.is_file() and cand == run.best and p.is_dir():
        raise PassionError(f"no checkpoint {cand.name} in {run.checkpoints}: the run never validated (no val cases "
                           f"in its split, train.val_cases=0, or trained before validation); use --checkpoint last")
    if not cand.is_file():
        raise PassionError(f"no checkpoint {cand.name} in {run.checkpoints}")
    return cand


def load_model(run_dir: str | Path, checkpoint: str = "last", device="cpu"):
    """(model, cfg, spec, ckpt dict, checkpoint path) for a run dir or a checkpoint file."""
    path = resolve_checkpoint(run_dir, str(checkpoint))
    try:
        ckpt = load_checkpoint(path)
    except PassionError:
        raise
    except Exception as exc:  # the unpickler raises e.g. KeyError on arbitrary bytes
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PassionError(f"{path}: not a readable passion checkpoint ({type(exc).__name__} {first[:120]})") from None
    try:
        model, cfg, spec = model_from_checkpoint(ckpt, device=device)
    except PassionError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PassionError(f"{path}: cannot rebuild the model of this checkpoint ({first[:200]})") from None
    return model, cfg, spec, ckpt, path


@dataclass
class InferenceSetup:
    """A trained model ready to predict, with what it was trained on and how to run it."""
    model: torch.nn.Module  # on `device`, in eval mode
    cfg: Config
    spec: DatasetSpec
    ckpt: dict
    checkpoint: Path
    run: RunDir
    device: torch.device
    precision: str
    overlap: float

    @property
    def preprocess(self) -> dict:
        return preprocess_of(self.ckpt)


def load_for_inference(run_or_ckpt: str | Path, checkpoint: str = "last", *, device: str | None = None,
                       precision: str | None = None, overlap: float | None = None,
                       warn_precision: bool = True) -> InferenceSetup:
    """The model of a run dir or checkpoint file on its device (argument, else the run's config), the
    host configured as the run's config says, and the precision and sliding-window overlap to use
    (argument, else the config's)."""
    from .inference import inference_precision
    from .runtime import configure_host, resolve_device, warn_if_slow_precision

    model, cfg, spec, ckpt, path = load_model(run_or_ckpt, checkpoint, device="cpu")
    dev = resolve_device(device or cfg.train.device)
    configure_host(cfg.train.threads, cfg.train.reuse_freed_memory)
    model = model.to(dev)
    precision = inference_precision(precision, cfg.train.precision, dev)
    if warn_precision:
        warn_if_slow_precision(dev, precision)
    overlap = cfg.eval.overlap if overlap is None else float(overlap)
    if not 0 <= overlap < 1:
        raise PassionError(f"overlap must be in [0, 1), got {overlap}")
    return InferenceSetup(model, cfg, spec, ckpt, path, RunDir.of(run_or_ckpt), dev, precision, overlap)


def model_from_checkpoint(ckpt: dict, device="cpu"):
    """Rebuild the model of a checkpoint; returns (model in eval mode, Config, DatasetSpec)."""
    cfg: Config = config_from_dict(ckpt["config"])
    spec = DatasetSpec.from_dict(ckpt["spec"])
    model = build_model_for(cfg, spec)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, spec


def build_model_for(cfg: Config, spec: DatasetSpec):
    """The one place where a config and a dataset spec become a backbone."""
    from ..models import build_model

    return build_model(
        cfg.model.name,
        num_modalities=spec.num_modalities,
        num_classes=spec.num_classes,
        base_width=cfg.model.base_width,
        patch_size=tuple(cfg.model.patch_size),
        spatial_dims=spec.spatial_dims,
        **cfg.model.options,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global Python, NumPy, torch (and CUDA) RNG states, as tensors and ints (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate((state["python_pos"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
