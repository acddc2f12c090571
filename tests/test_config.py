"""Config loading: numbers in exponent form (YAML 1.2 floats) from files and `--set`, clear errors."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from passion.config import Config, ConfigError, load_config, save_config


def _float_fields() -> list[str]:
    """Every float-typed key of the config, e.g. 'train.lr' (annotations are strings here)."""
    out = []
    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        if dataclasses.is_dataclass(sub):
            out += [f"{section.name}.{f.name}" for f in dataclasses.fields(sub) if f.type in ("float", "float | None")]
    return out


def test_set_accepts_exponent_without_dot():
    cfg = load_config(None, ["train.lr=2e-4", "train.epochs=30"])
    assert cfg.train.lr == 0.0002 and type(cfg.train.lr) is float
    assert cfg.train.epochs == 30 and type(cfg.train.epochs) is int


@pytest.mark.parametrize("key", _float_fields())
def test_every_float_field_accepts_exponent_forms(key):
    assert {"train.lr", "train.eps", "objective.eta", "eval.overlap", "train.grad_clip"} <= set(_float_fields())
    section, name = key.split(".")
    for text, value in (("5e-1", 0.5), ("1E-5", 1e-5)):
        got = getattr(getattr(load_config(None, [f"{key}={text}"]), section), name)
        assert got == value and type(got) is float


def test_yaml_file_with_exponent_floats(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 1E-5\n  betas: [0.9, 1e-3]\n  epochs: 30\n"
                    "objective:\n  kl_weight: 5e-1\n  eta: '2e-4'\n  options: {scale: 1e-3}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 1e-5
    assert cfg.train.betas == [0.9, 1e-3] and all(type(b) is float for b in cfg.train.betas)
    assert cfg.train.epochs == 30 and type(cfg.train.epochs) is int
    assert cfg.objective.kl_weight == 0.5 and cfg.objective.eta == 2e-4  # a quoted number is coerced too
    assert cfg.objective.options == {"scale": 1e-3}
    # what we save reads back identically
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == cfg.to_dict()


def test_ints_and_other_scalars_are_untouched():
    cfg = load_config(None, ["train.grad_clip=null", "model.patch_size=[16,16,16]", "train.seed=1_000"])
    assert cfg.train.grad_clip is None and cfg.model.patch_size == [16, 16, 16] and cfg.train.seed == 1000
    assert isinstance(yaml.safe_load("2e-4"), str)  # PyYAML's own loader is not changed globally


@pytest.mark.parametrize("item, key", [("train.lr=abc", "train.lr"), ("train.betas=[0.9, x]", "train.betas[1]"),
                                       ("objective.temperature=true", "objective.temperature")])
def test_non_numbers_name_the_key(item, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    msg = str(err.value)
    assert msg.startswith(f"{key} must be a number") and "\n" not in msg
