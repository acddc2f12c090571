"""reflect_pad equals F.pad(mode="reflect") in values and in its input gradient, for symmetric
and asymmetric pads in 2D and 3D, pads as wide as the size allows, and thin volumes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passion.models.reflect_pad import reflect_pad


@pytest.mark.parametrize("shape, pad", [
    ((2, 3, 6, 7, 8), (1, 1, 1, 1, 1, 1)),  # the convolutions' case
    ((1, 2, 5, 6, 7), (2, 1, 0, 2, 1, 3)),  # asymmetric, one axis unpadded
    ((1, 1, 2, 2, 2), (1, 1, 1, 1, 1, 1)),  # two planes: both borders reflect onto the same rows
    ((1, 2, 4, 5, 6), (3, 3, 0, 0, 2, 0)),  # pad = size - 1
    ((2, 3, 9, 10), (1, 1, 2, 2)),  # 2D
])
def test_reflect_pad_equals_f_pad(shape, pad):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y, y_ref = reflect_pad(x, pad), F.pad(x, pad, mode="reflect")
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    (gx,), (gx_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_ref, x, g)
    assert gx.is_contiguous()
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_reflect_pad_rejects_a_pad_as_wide_as_the_input():
    with pytest.raises(RuntimeError):
        reflect_pad(torch.randn(1, 1, 3, 3, 3), (3, 3, 0, 0, 0, 0))
