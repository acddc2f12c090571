"""The batch-of-one Conv3d fast path computes the same convolution as nn.Conv3d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from passion.models.blocks import Conv3d


@pytest.mark.parametrize("kernel, stride, padding, mode, depth", [
    (3, 1, 1, "reflect", 12), (3, 2, 1, "reflect", 12), (3, 1, 1, "zeros", 10), (1, 1, 0, "zeros", 8),
    (3, 1, 1, "reflect", 11),  # odd output depth: falls back to the plain kernel
])
def test_fast_conv3d_equals_conv3d(kernel, stride, padding, mode, depth):
    torch.manual_seed(0)
    ref = nn.Conv3d(3, 5, kernel, stride=stride, padding=padding, padding_mode=mode)
    fast = Conv3d(3, 5, kernel, stride=stride, padding=padding, padding_mode=mode)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, depth, 9, 10, requires_grad=True)
    y_ref, y_fast = ref(x), fast(x)
    assert y_fast.shape == y_ref.shape
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    gx_fast, gw_fast = torch.autograd.grad(y_fast, (x, fast.weight), g)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw_fast, gw_ref, atol=1e-4, rtol=1e-5)


@pytest.fixture
def conv3d_inputs(monkeypatch):
    """Shapes of the inputs every F.conv3d call receives (the fast path runs a depth-split batch of two)."""
    seen, real = [], torch.nn.functional.conv3d

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", spy)
    return seen


def test_a_single_fp32_volume_takes_the_fast_path(conv3d_inputs):
    fast = Conv3d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(fast(x), nn.functional.conv3d(x, fast.weight, fast.bias, padding=1))
    assert conv3d_inputs[0] == (2, 2, 6, 10, 10)  # two overlapping halves of the padded volume


def test_batches_and_autocast_take_the_plain_path(conv3d_inputs):
    fast = Conv3d(2, 2, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, 8)
    torch.testing.assert_close(fast(x), nn.functional.conv3d(x, fast.weight, fast.bias, padding=1))
    assert conv3d_inputs[0] == (2, 2, 8, 8, 8)  # the unsplit, unpadded batch
    conv3d_inputs.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x[:1]).dtype == torch.bfloat16
    assert conv3d_inputs == [(1, 2, 8, 8, 8)]
