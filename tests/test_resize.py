"""linear_resize equals F.interpolate(.., align_corners=True) in values and gradients, on the
CPU's per-axis matrix path and on the fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passion.models import resize
from passion.models.resize import interpolation_matrix, linear_resize

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@pytest.fixture
def interpolate_calls(monkeypatch):
    calls, real = [], F.interpolate

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    return calls


@pytest.mark.parametrize("shape, size", [
    ((2, 3, 5, 6, 7), (10, 12, 14)),  # the decoders' x2
    ((1, 4, 3, 3, 3), (24, 24, 24)),  # deep supervision x8
    ((2, 3, 9, 5, 4), (17, 5, 11)),  # odd sizes, one axis unchanged
    ((2, 3, 12, 10), (7, 19)),  # 2D, down along one axis
    ((3, 2, 8), (15,)),  # 1D
])
def test_matrix_path_equals_interpolate(shape, size, interpolate_calls):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    got = linear_resize(x, size)
    assert interpolate_calls == []  # the per-axis products, not F.interpolate
    ref = F.interpolate(x, size=size, mode=MODES[len(size)], align_corners=True)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               atol=1e-5, rtol=1e-5)


def test_a_reference_tensor_gives_the_size_and_equal_sizes_are_a_no_op():
    x = torch.randn(1, 2, 4, 4, 4)
    assert linear_resize(x, torch.empty(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    assert linear_resize(x, (4, 4, 4)) is x


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 2, 4, 4, 4, dtype=torch.float64),
    lambda: torch.randn(1, 1, resize.MAX_MATRIX_INPUT, 2, 2),  # long axes: the kernel is cheaper
])
def test_other_inputs_use_interpolate(make, interpolate_calls):
    x = make()
    size = tuple(2 * n for n in x.shape[2:])
    got = linear_resize(x, size)
    assert len(interpolate_calls) == 1
    torch.testing.assert_close(got, F.interpolate(x, size=size, mode="trilinear", align_corners=True))


def test_autocast_uses_interpolate(interpolate_calls):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_resize(torch.randn(1, 2, 4, 4, 4), (8, 8, 8))
    assert len(interpolate_calls) == 1


def test_interpolation_matrix_rows_are_convex_weights_hitting_the_corners():
    w = interpolation_matrix(5, 9)
    torch.testing.assert_close(w.sum(1), torch.ones(9))
    assert (w >= 0).all() and (w > 0).sum(1).max() <= 2
    assert w[0, 0] == 1 and w[-1, -1] == 1
    torch.testing.assert_close(interpolation_matrix(3, 1), torch.tensor([[1.0, 0.0, 0.0]]))
