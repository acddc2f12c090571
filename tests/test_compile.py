"""train.compile: which submodules are compiled, and the CPU fallback (nothing compiled, one note)."""
from __future__ import annotations

import pytest

from passion.config import load_config
from passion.models import build_model, list_models
from passion.models.compile import CPU_NOTE, compile_units

TINY = {"rfnet": dict(base_width=4, patch_size=(16, 16, 16))}


@pytest.mark.parametrize("name", list_models())
def test_units_are_the_stages_submodules(name):
    model = build_model(name, num_modalities=3, num_classes=3,
                        **TINY.get(name, dict(base_width=4, patch_size=(32, 32, 32))))
    units = compile_units(model)
    ids = {id(u) for u in units}
    assert all(id(e) in ids for e in model.encoders) and id(model.decoder_fuse) in ids
    assert id(model.decoder_sep) in ids
    assert all(any(True for _ in u.parameters()) for u in units)


def test_cpu_compiles_nothing_and_says_so(capsys):
    model = build_model("rfnet", num_modalities=3, num_classes=3, **TINY["rfnet"])
    assert model.compile_stages() == []
    assert CPU_NOTE in capsys.readouterr().err
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


def test_config_default_is_off():
    assert load_config().train.compile is False
    assert load_config(overrides=["train.compile=true"]).train.compile is True
