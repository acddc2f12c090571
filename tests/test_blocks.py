"""The CPU Conv3d fast paths (depth-split batch of one, input gradient as a forward convolution)
compute the same convolution and gradients as nn.Conv3d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from passion.models.blocks import Conv3d, _CpuConv3dFunction


@pytest.mark.parametrize("kernel, stride, padding, mode, depth", [
    (3, 1, 1, "reflect", 12), (3, 2, 1, "reflect", 12), (3, 1, 1, "zeros", 10), (1, 1, 0, "zeros", 8),
    (3, 1, 1, "reflect", 11),  # odd output depth: no depth split
    (3, 1, 2, "zeros", 12),  # with dilation 2 (below)
])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_conv3d_equals_conv3d(kernel, stride, padding, mode, depth, batch):
    torch.manual_seed(0)
    dilation = padding if kernel == 3 else 1
    ref = nn.Conv3d(3, 5, kernel, stride=stride, padding=padding, padding_mode=mode, dilation=dilation)
    fast = Conv3d(3, 5, kernel, stride=stride, padding=padding, padding_mode=mode, dilation=dilation)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 3, depth, 9, 10, requires_grad=True)
    y_ref, y_fast = ref(x), fast(x)
    assert y_fast.shape == y_ref.shape
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    gx_fast, gw_fast, gb_fast = torch.autograd.grad(y_fast, (x, fast.weight, fast.bias), g)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw_fast, gw_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gb_fast, gb_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stride, dilation", [((1, 1, 1), (1, 1, 1)), ((2, 2, 2), (1, 1, 1)), ((1, 1, 1), (2, 1, 2))])
def test_cpu_conv_function_gradients_pass_gradcheck(stride, dilation):
    """In float64 (no depth split there), against finite differences of the function itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: _CpuConv3dFunction.apply(x, w, b, stride, dilation), (x, w, b))


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


def test_the_input_gradient_runs_as_a_forward_convolution(monkeypatch):
    """A stride-1 training step's backward calls conv3d with the flipped kernel, channels swapped
    (in [5, 2, ...] -> [2, 5, ...]), on the output gradient padded by k - 1."""
    seen, real = [], torch.nn.functional.conv3d

    def spy(x, w, *args, **kwargs):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, *args, **kwargs)

    fast = Conv3d(2, 5, 3, padding=1)
    x = torch.randn(3, 2, 8, 8, 8, requires_grad=True)
    y = fast(x)
    monkeypatch.setattr(torch.nn.functional, "conv3d", spy)
    y.sum().backward()
    assert seen == [((3, 5, 12, 12, 12), (2, 5, 3, 3, 3))]
    seen.clear()
    wide = Conv3d(2, 16, 3, padding=1)  # > NARROW_OUTPUT_CHANNELS: convolution_backward, same gradient
    x.grad = None
    y = wide(x)
    gx, = torch.autograd.grad(y.sum(), x)
    assert seen == [((3, 2, 10, 10, 10), (16, 2, 3, 3, 3))]  # only the forward ran through conv3d
    ref = nn.functional.conv3d(x, wide.weight, wide.bias, padding=1)
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), x)[0], atol=1e-5, rtol=1e-5)


def test_batches_and_autocast_take_the_plain_path(conv3d_inputs):
    fast = Conv3d(2, 2, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), nn.functional.conv3d(x, fast.weight, fast.bias, padding=1))
    assert conv3d_inputs[0] == (2, 2, 8, 8, 8)  # the unsplit, unpadded batch
    conv3d_inputs.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x[:1]).dtype == torch.bfloat16
    assert conv3d_inputs == [(1, 2, 8, 8, 8)]
