"""Run configuration: dataclasses, YAML load/save, `--set a.b=value` overrides, validation.

A config is plain data; every stage reads the part it needs. Validation happens before any
work starts and fails with one line naming the key and what is wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .utils import PassionError, atomic_write_text


class ConfigError(PassionError, ValueError):
    """A configuration value is invalid; the message is one line meant for the user."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (YAML 1.1) plus YAML 1.2 floats: 1.1 reads `2e-4` or `1.0e5` as strings."""


# YAML 1.2 core-schema float; the lookahead keeps plain integers (`30`) ints whatever the resolver order
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?=.*[.eE])[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """Config YAML (files and `--set` values) is always read with ConfigLoader."""
    return yaml.load(text, Loader=ConfigLoader)


SETTINGS = ("idt", "idt_drop", "pdt")
PRECISIONS = ("fp32", "bf16", "fp16")
ACTIVATION_CHECKPOINTING = ("off", "decoder", "all")  # models/checkpointing.py


@dataclass
class DataConfig:
    cache: str = ""
    split: str = ""
    setting: str = "idt"
    augment: bool = True
    workers: int = 0
    # share of training patches centred on a foreground voxel (nnU-Net: 0.33); 0 = uniform crops
    foreground_fraction: float = 0.33


@dataclass
class ModelConfig:
    name: str = "rfnet"
    patch_size: list[int] = field(default_factory=lambda: [80, 80, 80])
    base_width: int = 8
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """`name` and `warmup_epochs` apply to every objective; each objective reads its hyper-parameters
    into its own options dataclass (method/objectives/), checked by one parse_options: PASSION's
    from the top-level keys below (as in the paper presets and saved runs), every other
    objective's from `options` (e.g. objective.options.alpha for ogm_ge)."""

    name: str = "passion"
    # PASSION's hyper-parameters (PassionOptions in method/objectives/passion.py)
    temperature: float = 4.0
    kl_weight: float = 0.5
    proto_weight: float = 0.1
    eta: float = 0.01
    eta_growth: float = 1.5
    eta_growth_every: int = 100
    beta_min: float = 0.1
    beta_max: float = 4.0
    warmup_epochs: int = 0  # epochs of single-modality losses only (every objective)
    options: dict[str, Any] = field(default_factory=dict)  # the other objectives' hyper-parameters


@dataclass
class TrainConfig:
    epochs: int = 300
    iters_per_epoch: int | None = None  # default: one pass over the training cases
    batch_size: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = True
    poly_power: float = 0.9
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    reuse_freed_memory: bool = True  # keep freed host memory for reuse (glibc); see engine/runtime.py
    # recompute activations in backward instead of storing them: off | decoder | all (models/checkpointing.py)
    activation_checkpointing: str = "off"
    compile: bool = False  # torch.compile the backbone's stages on CUDA; ignored on a CPU (models/compile.py)
    seed: int = 1037
    grad_clip: float | None = None
    checkpoint_every_iters: int = 0  # 0: only at epoch ends
    save_epochs: list[int] = field(default_factory=list)
    log_every: int = 1
    tensorboard: bool = False
    distributed_backend: str = "auto"  # auto: nccl on CUDA, gloo otherwise
    # validation on the split's val cases (engine/validation.py); best.pt keeps the best val_score
    val_every: int | None = None  # epochs between validations; null: max(1, round(epochs / 10)); always after the last
    val_cases: int | None = 8  # a fixed, seeded subsample of the val list; null: all; 0: no validation
    val_subsets: str = "all"  # subsets whose mean Dice is the score (the full subset is always scored too)


@dataclass
class EvalConfig:
    overlap: float = 0.5
    sw_batch_size: int = 1
    split: str = "test"


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of the parts that define a model and its training."""
        d = self.to_dict()
        d.pop("run_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; known: {', '.join(fields)}")
        sub = _SECTIONS.get(fields[key].type) if isinstance(fields[key].type, str) else None
        kwargs[key] = _from_dict(sub, value, path) if sub else _coerce(fields[key].type, value, path)
    return cls(**kwargs)


def _to_float(value, path: str) -> float:
    """A number, or a string holding one (e.g. a quoted "2e-4"), as float; bools are not numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{path} must be a number, got {value!r}")


def _coerce(type_text, value, path: str):
    """Float-typed fields (by their annotation text) get floats; everything else is kept as given."""
    if type_text in ("float", "float | None"):
        return None if value is None and type_text.endswith("None") else _to_float(value, path)
    if type_text == "list[float]":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list of numbers, got {value!r}")
        return [_to_float(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


_SECTIONS = {
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "ObjectiveConfig": ObjectiveConfig,
    "TrainConfig": TrainConfig,
    "EvalConfig": EvalConfig,
}


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data or {}, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: not a valid value ({str(exc).splitlines()[0]})") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    data = apply_overrides(data, overrides or [])
    cfg = config_from_dict(data)
    normalise(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def normalise(cfg: Config) -> Config:
    """Coerce shorthand values (e.g. an int patch size) and check simple ranges."""
    ps = cfg.model.patch_size
    if isinstance(ps, int):
        ps = [ps, ps, ps]
    if not isinstance(ps, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in ps):
        raise ConfigError(f"model.patch_size must be a positive int or a list of them, got {cfg.model.patch_size!r}")
    cfg.model.patch_size = list(ps)
    t = cfg.train
    if cfg.data.setting not in SETTINGS:
        raise ConfigError(f"data.setting must be one of {', '.join(SETTINGS)}, got {cfg.data.setting!r}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.activation_checkpointing is False:  # YAML 1.1 reads a bare `off` as false
        t.activation_checkpointing = "off"
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"train.activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                          f"got {t.activation_checkpointing!r}")
    if not isinstance(t.compile, bool):
        raise ConfigError(f"train.compile must be true or false, got {t.compile!r}")
    if not (isinstance(t.lr, (int, float)) and t.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {t.lr!r}")
    if not (isinstance(t.epochs, int) and t.epochs > 0):
        raise ConfigError(f"train.epochs must be a positive integer, got {t.epochs!r}")
    if not (isinstance(t.batch_size, int) and t.batch_size > 0):
        raise ConfigError(f"train.batch_size must be a positive integer, got {t.batch_size!r}")
    if t.iters_per_epoch is not None and not (isinstance(t.iters_per_epoch, int) and t.iters_per_epoch > 0):
        raise ConfigError(f"train.iters_per_epoch must be a positive integer or null, got {t.iters_per_epoch!r}")
    if t.val_every is not None and not (isinstance(t.val_every, int) and t.val_every > 0):
        raise ConfigError(f"train.val_every must be a positive integer or null, got {t.val_every!r}")
    if t.val_cases is not None and not (isinstance(t.val_cases, int) and t.val_cases >= 0):
        raise ConfigError(f"train.val_cases must be a non-negative integer or null (all), got {t.val_cases!r}")
    if not (isinstance(t.val_subsets, str) and t.val_subsets.strip()):
        raise ConfigError(f"train.val_subsets must be 'all' or subsets like 'flair+t1ce,t2', got {t.val_subsets!r}")
    if not 0 <= cfg.eval.overlap < 1:
        raise ConfigError(f"eval.overlap must be in [0, 1), got {cfg.eval.overlap!r}")
    return cfg
