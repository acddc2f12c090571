"""Objectives (baseline, PASSION) and the preference machinery, on the fake backbone."""
from __future__ import annotations

import io
import math
import threading

import pytest
import torch

from fakes import FakeBackbone, random_batch
from passion.config import ConfigError, ObjectiveConfig
from passion.method import build_objective, flatten_stats, list_objectives
from passion.method.objectives import ObjectiveModule
from passion.method.objectives.terms import available_pairs
from passion.method.preference import (PreferenceState, availability_weights, epoch_relative_preference,
                                       grow_eta, preference_gate, relative_preference_sums, update_beta)
from passion.utils import PassionError

NAMES = ["flair", "t1ce", "t2"]
COUNTS = [5, 3, 4]
ITERS = 10


def make(name: str = "passion", setting: str = "idt", all_reduce=None, **cfg):
    return build_objective(name, ObjectiveConfig(**cfg), 3, NAMES, COUNTS, ITERS, setting,
                           all_reduce=all_reduce)


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


# ---------------------------------------------------------------- preference: worked examples

def test_gate_worked_example():
    # d = [[.2, .4, 0], [.3, 0, .1]], a = [[1,1,0], [1,0,1]]
    # sample 0: dbar = .6/2 = .3 -> a*(d/dbar - 1) = [-1/3, +1/3, 0]
    # sample 1: dbar = .4/2 = .2 -> [+1/2, 0, -1/2]
    # rp = [1/6, 1/3, -1/2] -> gate = [on, on, off]
    d = torch.tensor([[0.2, 0.4, 0.0], [0.3, 0.0, 0.1]])
    a = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    rp = relative_preference_sums(d, a)
    torch.testing.assert_close(rp, torch.tensor([1 / 6, 1 / 3, -0.5]))
    assert preference_gate(rp).tolist() == [True, True, False]


def test_gate_ignores_samples_with_zero_distance():
    d = torch.zeros(1, 3)
    a = torch.ones(1, 3)
    assert relative_preference_sums(d, a).tolist() == [0.0, 0.0, 0.0]


def test_beta_update_worked_example_with_eta_growth_at_epoch_0():
    # Epoch sums of d: [.5, .4, .1] over [2, 1, 1] samples -> D = [.25, .4, .1], Dbar = .25
    # r = (Dbar - D) / Dbar = [0, -.6, .6]; eta = .01 * 1.5 = .015 at epoch 0
    # beta - eta r = [1, 1.009, .991] -> * sqrt(3) / ||.|| = [0.99997300, 1.00897276, 0.99097324]
    state = PreferenceState(3, eta=0.01)
    state.accumulate(torch.tensor([0.5, 0.4, 0.1]), torch.tensor([2.0, 1.0, 1.0]))
    out = state.end_epoch(0)
    torch.testing.assert_close(torch.tensor(out["distance"]), torch.tensor([0.25, 0.4, 0.1]))
    torch.testing.assert_close(torch.tensor(out["relative_preference"]), torch.tensor([0.0, -0.6, 0.6]))
    assert out["eta"] == pytest.approx(0.015)
    torch.testing.assert_close(state.beta, torch.tensor([0.99997300, 1.00897276, 0.99097324]))
    assert state.beta.norm().item() == pytest.approx(math.sqrt(3))
    assert state.dist_sum.tolist() == [0.0, 0.0, 0.0]  # reset for the next epoch


def test_beta_clamp_then_renormalise():
    # [3.99, .12, 1] - .1 * [-1, 1, 0] = [4.09, .02, 1] -> clamp [4, .1, 1]
    # -> sqrt(3) * [4, .1, 1] / sqrt(17.01) = [1.67984210, 0.04199605, 0.41996053]
    got = update_beta(torch.tensor([3.99, 0.12, 1.0]), torch.tensor([-1.0, 1.0, 0.0]), 0.1, 0.1, 4.0)
    torch.testing.assert_close(got, torch.tensor([1.67984210, 0.04199605, 0.41996053]))


def test_eta_schedule_grows_at_0_and_100_only():
    eta = 0.01
    history = []
    for epoch in range(201):
        eta = grow_eta(eta, epoch, 1.5, 100)
        history.append(eta)
    assert history[0] == pytest.approx(0.015)
    assert history[99] == pytest.approx(0.015)
    assert history[100] == pytest.approx(0.0225)
    assert history[199] == pytest.approx(0.0225)
    assert history[200] == pytest.approx(0.03375)


def test_epoch_preference_unseen_modality_gets_zero():
    D, r = epoch_relative_preference(torch.tensor([0.4, 0.0, 0.2]), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(D, torch.tensor([0.2, 0.0, 0.2]))
    torch.testing.assert_close(r, torch.zeros(3))


# ---------------------------------------------------------------- weights and config errors

def test_idt_and_pdt_weights():
    torch.testing.assert_close(availability_weights(COUNTS, ITERS, NAMES, "idt"),
                               torch.tensor([2.0, 10 / 3, 2.5]))
    torch.testing.assert_close(availability_weights(COUNTS, ITERS, NAMES, "idt_drop"),
                               torch.tensor([2.0, 10 / 3, 2.5]))
    assert availability_weights(COUNTS, ITERS, NAMES, "pdt").tolist() == [1.0, 1.0, 1.0]
    assert make(setting="pdt").weights.tolist() == [1.0, 1.0, 1.0]


def test_modality_absent_from_every_case_is_an_error():
    with pytest.raises(PassionError, match="t1ce"):
        build_objective("passion", ObjectiveConfig(), 3, NAMES, [5, 0, 4], ITERS, "idt")


def test_registry():
    assert {"baseline", "passion"} <= set(list_objectives())
    with pytest.raises(ConfigError, match="objective.name"):
        make("nope")


# ---------------------------------------------------------------- the objective itself

def test_batched_single_modality_fuse_equals_separate_calls():
    model = FakeBackbone()
    batch = random_batch(batch=2)
    feats = model.encode(batch["image"], batch["mask"])
    for mask in ([[True] * 3, [True] * 3], [[True, False, True], [False, True, True]]):
        a = torch.tensor(mask)
        b_idx, m_idx = available_pairs(feats, a)
        out = model.fuse_single(feats, b_idx, m_idx)
        for p, (b, m) in enumerate(zip(b_idx.tolist(), m_idx.tolist())):
            e_m = torch.zeros(2, 3, dtype=torch.bool)
            e_m[:, m] = True
            ref = model.fuse(feats, e_m)
            torch.testing.assert_close(out.logits[p], ref.logits[b])
            torch.testing.assert_close(out.aux_logits[0][p], ref.aux_logits[0][b])
            torch.testing.assert_close(out.decoder_features[0][p], ref.decoder_features[0][b])


def test_passion_encodes_once_and_fuses_twice():
    model = FakeBackbone()
    make()(model, random_batch(), 0)
    assert model.encode_calls == 1 and model.fuse_calls == 2


def test_passion_total_matches_formula_from_stats():
    obj = make()
    out = obj(FakeBackbone(), random_batch(mask=[[True, False, True], [True, True, False]]), 0)
    s = out.stats
    expect = s["fuse"] + s["aux"]
    for n in NAMES:
        gbw = s["gate"][n] * s["beta"][n] * s["weight"][n]
        expect += gbw * s["sep"][n] + 0.5 * s["beta"][n] * s["weight"][n] * s["kl"][n]
        expect += 0.1 * s["gate"][n] * s["weight"][n] * s["proto"][n]
    assert out.loss.item() == pytest.approx(expect, rel=1e-5)
    for key in ("sep", "kl", "proto", "distance", "gate", "beta", "relative_preference", "weight"):
        assert list(s[key]) == NAMES
    assert "sep/flair" in flatten_stats(s)


@pytest.mark.parametrize("name", ["baseline", "passion"])
def test_unavailable_modality_is_exactly_zero_and_gets_no_gradient(name):
    model = FakeBackbone()
    batch = random_batch(mask=[[False, True, True], [False, True, False]])
    out = make(name)(model, batch, 0)
    out.loss.backward()
    assert out.stats["sep"]["flair"] == 0.0
    if name == "passion":
        assert out.stats["kl"]["flair"] == 0.0 and out.stats["proto"]["flair"] == 0.0
        assert out.stats["distance"]["flair"] == 0.0 and out.stats["distance"]["t2"] > 0
    grads = [p.grad for p in model.encoders[0].parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.encoders[1].parameters())


def test_pdt_uses_every_modality_in_single_losses():
    out = make(setting="pdt")(FakeBackbone(), random_batch(mask=[[True, False, False], [False, True, False]]), 0)
    assert all(out.stats["sep"][n] > 0 and out.stats["kl"][n] > 0 for n in NAMES)
    assert all(out.stats["weight"][n] == 1.0 for n in NAMES)


def test_warmup_only_weighted_sep_and_beta_frozen():
    model = FakeBackbone()
    obj = make(warmup_epochs=1)
    out = obj(model, random_batch(), 0)
    s = out.stats
    expect = sum(s["beta"][n] * s["weight"][n] * s["sep"][n] for n in NAMES)
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert model.fuse_calls == 0
    ep = obj.end_epoch(0)
    assert ep["beta"] == {n: 1.0 for n in NAMES} and ep["eta"] == pytest.approx(0.01)
    obj(model, random_batch(), 1)
    assert model.fuse_calls == 2


@pytest.mark.parametrize("name", ["baseline", "passion"])
def test_overfitting_one_volume_drives_loss_down(name):
    # PASSION's total switches terms on and off with the gate, so the segmentation terms
    # (fused + aux + every single-modality loss, ungated) are tracked alongside the total.
    model = FakeBackbone(width=4)
    obj = make(name)
    batch = random_batch(batch=1, size=8, mask=[[True, True, False]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    totals, seg = [], []
    for _ in range(30):
        out = obj(model, batch, 1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        totals.append(out.loss.item())
        seg.append(out.stats["fuse"] + out.stats["aux"] + sum(out.stats["sep"].values()))
    assert seg[-1] < 0.75 * seg[0], seg
    assert sum(totals[-5:]) < 0.8 * sum(totals[:5]), totals


class _TwoRanks:
    """Simulates a sum all-reduce between threads, adding rank tensors in rank order."""

    def __init__(self, n: int = 2):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def fn(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return total
        return all_reduce


def test_all_reduced_gate_equals_concatenated_batch():
    model = FakeBackbone()
    mask = [[True, False, True], [True, True, True], [False, True, True], [True, True, False]]
    batch = random_batch(batch=4, mask=mask, seed=3)
    batch["target"][3][batch["target"][3] == 2] = 1  # class 2 absent from one sample of rank 1
    single = make()
    ref = single(model, batch, 0).stats
    ref_epoch = single.end_epoch(0)

    group = _TwoRanks()
    objs = [make(all_reduce=group.fn(r)) for r in range(2)]
    halves = [{k: v[2 * r:2 * r + 2] for k, v in batch.items()} for r in range(2)]
    results: list = [None, None]

    def run(rank: int) -> None:
        stats = objs[rank](model, halves[rank], 0).stats
        results[rank] = (stats, objs[rank].end_epoch(0))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for stats, epoch in results:
        assert stats["gate"] == ref["gate"]
        for n in NAMES:
            assert stats["relative_preference"][n] == pytest.approx(ref["relative_preference"][n], abs=1e-5)
            assert epoch["beta"][n] == pytest.approx(ref_epoch["beta"][n], abs=1e-6)
    assert results[0][1]["beta"] == results[1][1]["beta"]


def test_state_dict_round_trip_with_weights_only():
    model = FakeBackbone()
    obj = make()
    obj(model, random_batch(), 0)
    obj.end_epoch(0)
    obj(model, random_batch(seed=1), 1)  # mid-epoch sums must survive too
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.state_dict() == obj.state_dict()
    assert restored.end_epoch(1) == obj.end_epoch(1)


def test_objective_module_wraps_model_for_ddp():
    model = FakeBackbone()
    wrapped = ObjectiveModule(model, make("baseline"))
    out = wrapped(random_batch(), 0)
    assert out.loss.requires_grad and set(out.stats) == {"loss", "fuse", "aux", "sep"}


@pytest.mark.parametrize("name", ["baseline", "passion"])
def test_bf16_autocast_gives_fp32_loss(name):
    model = FakeBackbone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make(name)(model, random_batch(), 0)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()


def test_ddp_wrapped_backbone_is_refused():
    import os
    import tempfile

    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(FakeBackbone())
            with pytest.raises(PassionError, match="ObjectiveModule"):
                make()(ddp, random_batch(), 0)
            out = torch.nn.parallel.DistributedDataParallel(ObjectiveModule(FakeBackbone(), make()))(
                random_batch(), 0)
            out.loss.backward()
        finally:
            dist.destroy_process_group()
