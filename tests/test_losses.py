"""Losses of METHOD.md section 4/5 against hand-computed values on 2x2 images."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from passion.method import losses as L

# Sample 1: target [[0,0],[0,1]]; P(class 1) = [[.2,.5],[.001,.9]].
# Sample 2: target [[1,1],[1,0]]; P(class 1) = [[.001,.5],[.5,.5]] (the .001 hits the 0.005 clamp).
TARGET = torch.tensor([[[0, 0], [0, 1]], [[1, 1], [1, 0]]])
P1 = torch.tensor([[[0.2, 0.5], [0.001, 0.9]], [[0.001, 0.5], [0.5, 0.5]]])
PROBS = torch.stack([1 - P1, P1], dim=1)


def test_one_hot_layout():
    y = L.one_hot(TARGET, 2)
    assert y.shape == (2, 2, 2, 2) and y.dtype == torch.float32
    assert y[0, 1, 1, 1] == 1 and y[0, 0, 1, 1] == 0


def test_weighted_ce_hand_values():
    # Sample 1: w0 = 1 - 3/4 = .25, w1 = .75
    #   (.25*-ln .8 + .25*-ln .5 + .25*-ln .999 + .75*-ln .9) / 4 = 0.0770857987
    # Sample 2: w1 = .25, w0 = .75; -ln clamp(.001) = -ln .005
    #   (.25*-ln .005 + 2*.25*-ln .5 + .75*-ln .5) / 4 = 0.5477533293
    got = L.weighted_ce(PROBS, L.one_hot(TARGET, 2))
    torch.testing.assert_close(got, torch.tensor([0.0770857987, 0.5477533293]))


def test_soft_dice_hand_values():
    # Sample 1: class 0: 2*2.299/(2.399+3+1e-7); class 1: 2*.9/(1.601+1+1e-7) -> 1 - mean = 0.2281596637
    # Sample 2: class 0: 2*.5/(2.499+1);  class 1: 2*1.001/(1.501+3)        -> 0.6347070148
    got = L.soft_dice(PROBS, L.one_hot(TARGET, 2))
    torch.testing.assert_close(got, torch.tensor([0.2281596637, 0.6347070148]))


def test_seg_is_wce_plus_dice_and_fp32_under_half_inputs():
    y = L.one_hot(TARGET, 2)
    got = L.seg_loss(PROBS.to(torch.bfloat16), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(L.seg_loss(PROBS, y), torch.tensor([0.0770857987 + 0.2281596637,
                                                                     0.5477533293 + 0.6347070148]))


def test_aux_seg_weights_and_upsampling_after_softmax():
    # A 1x1 aux map with logits (0, ln 3) -> probs (.25, .75) everywhere after upsampling to 2x2.
    # Against sample 1: WCE = (3*.25*-ln .25 + .75*-ln .75)/4 = 0.3138705813,
    # Dice = 1 - (1.5/4 + 1.5/4)/2 = 0.625 -> Seg = 0.9388705907; two aux maps: (1/2 + 1/4) * Seg.
    z = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    y = L.one_hot(TARGET[:1], 2)
    got = L.aux_seg_loss([z, z], y)
    torch.testing.assert_close(got, torch.tensor([0.7041529430]))


def test_aux_upsamples_probabilities_not_logits():
    torch.manual_seed(0)
    z = torch.randn(1, 3, 2, 2, 2) * 5
    target = torch.randint(0, 3, (1, 4, 4, 4))
    y = L.one_hot(target, 3)
    p_after = F.interpolate(torch.softmax(z, 1), size=(4, 4, 4), mode="trilinear", align_corners=True)
    p_before = torch.softmax(F.interpolate(z, size=(4, 4, 4), mode="trilinear", align_corners=True), 1)
    got = L.aux_seg_loss([z], y)
    torch.testing.assert_close(got, 0.5 * L.seg_loss(p_after, y))
    assert not torch.allclose(got, 0.5 * L.seg_loss(p_before, y))


def test_tempered_kl_hand_values():
    # T = 4. Teacher logits (4 ln 3, 0) -> q_v = (.75, .25); student (0, 0) -> q_u = (.5, .5).
    #   16 * (.75 ln 1.5 + .25 ln .5) / 2 = 1.0464962875
    # Teacher (4 ln 999, 0) -> (.999, .001) clamped to (.999, .005):
    #   16 * (.999 ln 1.998 + .005 ln .01) / 2 = 5.3474294609
    teacher = torch.tensor([[4 * math.log(3.0), 0.0], [4 * math.log(999.0), 0.0]]).reshape(2, 2, 1, 1)
    student = torch.zeros(2, 2, 1, 1)
    got = L.tempered_kl(student, teacher, 4.0)
    torch.testing.assert_close(got, torch.tensor([1.0464962875, 5.3474294609]))
    torch.testing.assert_close(L.tempered_kl(teacher, teacher, 4.0), torch.zeros(2))


def test_kl_with_aux_adds_half_weighted_upsampled_terms():
    teacher = torch.tensor([4 * math.log(3.0), 0.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    student = torch.zeros(1, 2, 2, 2)
    aux_t, aux_s = teacher[:, :, :1, :1], student[:, :, :1, :1]
    got = L.kl_with_aux(student, teacher, [aux_s], [aux_t], 4.0)
    torch.testing.assert_close(got, torch.tensor([1.0464962875 * 1.5]))


def test_proto_distill_hand_values():
    # Target [[0, 1]] (1x2 image), both classes present. Student features: v0 = (1,0), v1 = (0,1)
    # -> prototypes P0 = (1,0), P1 = (0,1) -> maps s0 = [1, 0], s1 = [0, 1].
    # Teacher: v0 = (1,0), v1 = (1,1) -> P0 = (1,0), P1 = (1,1) -> s0 = [1, 1/sqrt2], s1 = [1/sqrt2, 1].
    # Differences: [0, -.7071, -.7071, 0] -> MSE .25, mean abs .3535533906.
    target = torch.tensor([[[0, 1]]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    teacher = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    y = L.one_hot(target, 2)
    classes = L.class_missing_counts(y) == 0
    mse, dist = L.proto_distill(student, teacher, y, classes)
    torch.testing.assert_close(mse, torch.tensor([0.25]))
    torch.testing.assert_close(dist, torch.tensor([0.3535533906]))


def test_proto_uses_only_classes_present_in_every_sample():
    target = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 1, 1]]])  # class 2 absent from sample 2
    y = L.one_hot(target, 3)
    missing = L.class_missing_counts(y)
    torch.testing.assert_close(missing, torch.tensor([0.0, 0.0, 1.0]))
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 1, 4), torch.randn(2, 4, 1, 4)
    full = L.proto_distill(s, t, y, missing == 0)
    only01 = L.proto_distill(s, t, y[:, :2], torch.tensor([True, True]))
    torch.testing.assert_close(full[0], only01[0])
    none = L.proto_distill(s, t, y, torch.zeros(3, dtype=torch.bool))
    assert none[0].tolist() == [0.0, 0.0] and none[1].tolist() == [0.0, 0.0]


def test_shared_teacher_rows_equal_a_repeated_teacher():
    """PASSION computes each sample's teacher once and maps every student row to it (rows=)."""
    torch.manual_seed(0)
    rows = torch.tensor([0, 0, 1, 1, 1])
    teacher, student = torch.randn(2, 3, 4, 4, 4), torch.randn(5, 3, 4, 4, 4)
    t_aux, s_aux = torch.randn(2, 3, 2, 2, 2), torch.randn(5, 3, 2, 2, 2)
    shared = L.kl_with_aux(student, teacher, [s_aux], [t_aux], 4.0, rows=rows)
    repeated = L.kl_with_aux(student, teacher[rows], [s_aux], [t_aux[rows]], 4.0)
    torch.testing.assert_close(shared, repeated)
    y = L.one_hot(torch.randint(0, 3, (2, 4, 4, 4)), 3)
    classes = L.class_missing_counts(y) == 0
    g_t, g_s = torch.randn(2, 6, 4, 4, 4), torch.randn(5, 6, 4, 4, 4)
    for a, b in zip(L.proto_distill(g_s, g_t, y, classes, rows=rows),
                    L.proto_distill(g_s, g_t[rows], y[rows], classes)):
        torch.testing.assert_close(a, b)


def test_proto_teacher_gets_no_gradient_and_student_does():
    target = torch.tensor([[[0, 1, 1, 0]]])
    y = L.one_hot(target, 2)
    s = torch.randn(1, 3, 1, 4, requires_grad=True)
    t = torch.randn(1, 3, 1, 4)
    mse, _ = L.proto_distill(s, t.detach(), y, torch.tensor([True, True]))
    mse.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_similarity_maps_match_torch_cosine():
    torch.manual_seed(1)
    f, p = torch.randn(2, 5, 3, 4, 4), torch.randn(2, 3, 5)
    ref = F.cosine_similarity(f[:, None], p[..., None, None, None], dim=2, eps=L.COSINE_EPS)
    torch.testing.assert_close(L.similarity_maps(f, p), ref)


def test_similarity_maps_of_an_all_zero_feature_are_zero_with_finite_gradients():
    torch.manual_seed(1)
    f = torch.randn(1, 5, 2, 2, 2)
    f[:, :, 0, 0, 0] = 0.0  # e.g. a voxel where every decoder channel is zero
    f.requires_grad_(True)
    p = torch.randn(1, 3, 5)
    sim = L.similarity_maps(f, p)
    assert torch.equal(sim[:, :, 0, 0, 0], torch.zeros(1, 3))
    sim.sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_target_at_nearest_downsampling():
    t = torch.arange(16).reshape(1, 4, 4)
    assert L.target_at(t, (4, 4)) is t
    assert L.target_at(t, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


@pytest.mark.parametrize("fn", [L.weighted_ce, L.soft_dice])
def test_losses_are_per_sample(fn):
    y = L.one_hot(TARGET, 2)
    both = fn(PROBS, y)
    torch.testing.assert_close(both[1:], fn(PROBS[1:], y[1:]))
