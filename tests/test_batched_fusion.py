"""fuse_teacher_and_singles (PASSION's teacher and students in one decoder pass) equals the two
separate calls, fuse and fuse_single, in values and gradients, for every backbone (float64)."""
from __future__ import annotations

import pytest
import torch

from passion.config import ObjectiveConfig
from passion.method import build_objective
from passion.models import Backbone, build_model, list_models

M, C = 3, 3
pytestmark = pytest.mark.usefixtures("seed_and_one_thread")
TINY = {"rfnet": dict(base_width=4, patch_size=(16, 16, 16)),
        "mmformer": dict(base_width=4, patch_size=(32, 32, 32), dropout=0.0),
        "m2ftrans": dict(base_width=4, patch_size=(32, 32, 32), dropout=0.0, cross_dropout=0.0)}


def tiny(name: str, dims: int = 3):
    cfg = dict(TINY.get(name, dict(base_width=8, patch_size=(32, 32, 32))), num_modalities=M, num_classes=C)
    if dims == 2:
        cfg.update(spatial_dims=2, patch_size=cfg["patch_size"][:2])
    torch.manual_seed(0)
    return build_model(name, **cfg).double().train(), cfg  # train mode: dropout 0, same as eval


def outputs(out):
    return [out.logits, *out.aux_logits, *out.decoder_features]


def run(model, feats, mask, b_idx, m_idx, batched: bool):
    leaves = feats.map(lambda t: t.detach().clone().requires_grad_())
    if batched:
        teacher, single = model.fuse_teacher_and_singles(leaves, mask, b_idx, m_idx)
    else:
        teacher, single = Backbone.fuse_teacher_and_singles(model, leaves, mask, b_idx, m_idx)
    model.zero_grad(set_to_none=True)
    loss = sum((i + 1) * t.square().mean() for i, t in enumerate(outputs(teacher)))
    loss = loss + sum((i + 2) * t.sin().mean() for i, t in enumerate(outputs(single)))
    loss.backward()
    grads = [t.grad for t in leaves.scales + list(leaves.extra.values())]
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs(teacher) + outputs(single), grads, params


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("dims", [3, 2])
def test_batched_teacher_and_students_equal_separate_calls(name, dims):
    try:
        model, cfg = tiny(name, dims)
    except ValueError:
        pytest.skip(f"{name} has no 2D variant")
    x = torch.randn(2, M, *cfg["patch_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    b_idx, m_idx = mask.nonzero(as_tuple=True)
    feats = model.encode(x, mask)
    outs_b, grads_b, params_b = run(model, feats, mask, b_idx, m_idx, batched=True)
    outs_s, grads_s, params_s = run(model, feats, mask, b_idx, m_idx, batched=False)
    assert len(outs_b) == len(outs_s)
    for a, b in zip(outs_b, outs_s):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads_b, grads_s):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert params_b.keys() == params_s.keys() and params_b
    for k in params_b:
        torch.testing.assert_close(params_b[k], params_s[k], rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize("name", list_models())
def test_passion_objective_step_is_unchanged_by_batching(name, monkeypatch):
    """The whole PASSION loss and its parameter gradients, batched pass vs the two calls."""
    model, cfg = tiny(name)
    batch = {"image": torch.randn(2, M, *cfg["patch_size"], dtype=torch.float64),
             "target": torch.randint(0, C, (2, *cfg["patch_size"])),
             "mask": torch.tensor([[True, False, True], [False, True, True]])}
    results = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(type(model), "fuse_teacher_and_singles", Backbone.fuse_teacher_and_singles)
        obj = build_objective("passion", ObjectiveConfig(), M, ["a", "b", "c"], [4, 4, 4], 10, "idt")
        model.zero_grad(set_to_none=True)
        out = obj(model, batch, 0)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    (loss_b, g_b), (loss_s, g_s) = results
    torch.testing.assert_close(loss_b, loss_s, rtol=1e-10, atol=0)
    assert g_b.keys() == g_s.keys()
    for k in g_b:
        torch.testing.assert_close(g_b[k], g_s[k], rtol=1e-8, atol=1e-12, msg=k)


def _passion_step(model, batch, setting="idt"):
    obj = build_objective("passion", ObjectiveConfig(), M, ["a", "b", "c"], [4, 4, 4], 10, setting)
    model.zero_grad(set_to_none=True)
    out = obj(model, batch, 0)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("masks, setting", [
    ([[False, True, False]], "idt"),                         # one sample, one modality: no student runs
    ([[True, False, False], [True, False, True]], "idt"),   # one sample reuses, the other fuses students
    ([[False, False, True], [True, True, False]], "pdt"),   # pdt: students of every modality, teacher mask drawn
])
def test_students_on_their_own_samples_mask_reuse_the_teacher_row(name, masks, setting, monkeypatch):
    """A student whose one-hot mask is its sample's mask IS the teacher's row: the PASSION loss,
    its logged values and every parameter gradient equal those of fusing every student."""
    model, cfg = tiny(name)
    assert model.fuse_is_deterministic()  # TINY turns dropout off
    n = len(masks)
    batch = {"image": torch.randn(n, M, *cfg["patch_size"], dtype=torch.float64),
             "target": torch.randint(0, C, (n, *cfg["patch_size"])),
             "mask": torch.tensor(masks)}
    calls = []
    original = type(model).fuse_teacher_and_singles
    monkeypatch.setattr(type(model), "fuse_teacher_and_singles",
                        lambda self, f, mask, b, m: calls.append(b.numel()) or original(self, f, mask, b, m))
    reused, g_reused = _passion_step(model, batch, setting)
    students = 3 * n if setting == "pdt" else int(batch["mask"].sum())
    assert sum(calls) == students - sum(1 for row in masks if sum(row) == 1)
    monkeypatch.setattr(type(model), "fuse_is_deterministic", lambda self: False)
    calls.clear()
    every, g_every = _passion_step(model, batch, setting)
    assert calls == [students]
    torch.testing.assert_close(reused.loss.detach(), every.loss.detach(), rtol=1e-10, atol=1e-12)
    for key, value in every.stats.items():
        assert reused.stats[key] == pytest.approx(value, rel=1e-7, abs=1e-9), key
    assert g_reused.keys() == g_every.keys()
    for k in g_every:
        torch.testing.assert_close(g_reused[k], g_every[k], rtol=1e-8, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["mmformer", "m2ftrans"])
def test_fusion_with_active_dropout_is_not_deterministic(name):
    model = build_model(name, num_modalities=M, num_classes=C, base_width=4, patch_size=(32, 32, 32)).train()
    assert not model.fuse_is_deterministic()  # students draw their own dropout masks: all of them run
    assert model.eval().fuse_is_deterministic()
    assert build_model("rfnet", num_modalities=M, num_classes=C, base_width=4,
                       patch_size=(16, 16, 16)).train().fuse_is_deterministic()
