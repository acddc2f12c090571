"""The batch-of-one Conv3d fast path and the pointwise (1x1x1) matrix-product path compute the
same convolution as nn.Conv3d; the fused InstanceNorm + in-place LeakyReLU equals the modules
applied one after the other."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from passion.models import blocks
from passion.models.blocks import Conv3d, ConvNormAct, norm_act


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced t."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kernel, stride, padding, mode, depth", [
    (3, 1, 1, "reflect", 12), (3, 2, 1, "reflect", 12), (3, 1, 1, "zeros", 10), (1, 1, 0, "zeros", 8),
    (3, 1, 1, "reflect", 11),  # odd output depth: falls back to the plain kernel
    (3, 2, 1, "reflect", 4),  # one output plane per half
    (1, 2, 0, "zeros", 12),  # stride above the kernel: a gap between the halves
    (3, 2, 1, "zeros", 13),  # padded depth not covered by the two windows
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
    # no full-size zero-filled gradient per slice of the input or the output
    assert not graph_nodes(y_fast) & {"SliceBackward0", "SelectBackward0"}


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


@pytest.mark.parametrize("mode, size, seen", [("reflect", 34, (1, 16, 36, 36, 36)), ("zeros", 36, (1, 16, 36, 36, 36))])
def test_a_volume_that_already_takes_onednn_is_not_split(conv3d_inputs, mode, size, seen):
    fast = Conv3d(16, 2, 3, padding=1, padding_mode=mode)
    ref = nn.Conv3d(16, 2, 3, padding=1, padding_mode=mode)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, 16, size, size, size)  # C*D*H of the input conv3d sees: 20736 > 20480
    torch.testing.assert_close(fast(x), ref(x))
    assert conv3d_inputs[0] == seen


def test_batches_and_autocast_take_the_plain_path(conv3d_inputs):
    fast = Conv3d(2, 2, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, 8)
    torch.testing.assert_close(fast(x), nn.functional.conv3d(x, fast.weight, fast.bias, padding=1))
    assert conv3d_inputs[0] == (2, 2, 8, 8, 8)  # the unsplit, unpadded batch
    conv3d_inputs.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x[:1]).dtype == torch.bfloat16
    assert conv3d_inputs == [(1, 2, 8, 8, 8)]


@pytest.mark.parametrize("batch, bias", [(1, True), (3, True), (2, False)])
def test_pointwise_conv3d_is_a_matrix_product_equal_to_conv3d(conv3d_inputs, batch, bias):
    torch.manual_seed(0)
    ref = nn.Conv3d(6, 4, 1, bias=bias)
    fast = Conv3d(6, 4, 1, bias=bias)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 6, 5, 7, 9, requires_grad=True)
    y_fast = fast(x)
    assert conv3d_inputs == []  # no convolution kernel ran
    y_ref = ref(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_ref)
    params = [x, *fast.parameters()]
    grads_fast = torch.autograd.grad(y_fast, params, g)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["stride", "float64", "autocast", "channels_last"])
def test_other_1x1_convolutions_take_the_convolution_kernel(conv3d_inputs, case):
    fast = Conv3d(4, 2, 1, stride=2 if case == "stride" else 1)
    x = torch.randn(2, 4, 6, 6, 6)
    if case == "float64":
        fast, x = fast.double(), x.double()
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        fast(x)
    assert conv3d_inputs == [tuple(x.shape)]


@pytest.mark.parametrize("stride, bias, batch", [(1, True, 2), (2, False, 1), (1, True, 1)])
def test_channels_last_input_gradient_equals_conv3d_backward(monkeypatch, stride, bias, batch):
    """Narrow convolutions on CPUs that block channels by 16: the input gradient is computed on
    channels-last copies, the rest as before; tested on any CPU by forcing the path."""
    monkeypatch.setattr(blocks, "_BLOCK_16_CHANNELS", True)
    torch.manual_seed(0)
    ref = nn.Conv3d(5, 6, 3, stride=stride, padding=1, padding_mode="reflect", bias=bias)
    fast = Conv3d(5, 6, 3, stride=stride, padding=1, padding_mode="reflect", bias=bias)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 5, 12, 11, 10, requires_grad=True)
    y_ref, y_fast = ref(x), fast(x)
    assert "_ChannelsLastInputGradConv3dBackward" in graph_nodes(y_fast)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    grads_fast = torch.autograd.grad(y_fast, [x, *fast.parameters()], g)
    for a, b in zip(grads_fast, grads_ref):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # only the weight needs a gradient (a first layer): no input gradient is computed
    (gw,) = torch.autograd.grad(fast(x.detach()), [fast.weight], g)
    torch.testing.assert_close(gw, grads_ref[1], rtol=1e-5, atol=1e-4)


def test_wide_convolutions_keep_the_plain_backward(monkeypatch):
    monkeypatch.setattr(blocks, "_BLOCK_16_CHANNELS", True)
    wide = Conv3d(4, 16, 3, padding=1)
    assert "_ChannelsLastInputGradConv3dBackward" not in graph_nodes(wide(torch.randn(2, 4, 6, 6, 6,
                                                                                      requires_grad=True)))


@pytest.mark.parametrize("dims, affine", [(3, False), (3, True), (2, False)])
@pytest.mark.parametrize("path", ["norm_act", "batch_norm_act"])
def test_norm_act_equals_the_modules_in_turn(dims, affine, path):
    """norm_act (group_norm on the CPU) and the batch_norm-on-a-reshape path it takes on other
    devices both equal InstanceNorm then LeakyReLU."""
    torch.manual_seed(0)
    block = ConvNormAct(3, 4, dims=dims, affine=affine).double()  # float64: no rounding differences
    if affine:
        nn.init.normal_(block.norm.weight)
        nn.init.normal_(block.norm.bias)
    x = torch.randn(2, 3, *(6,) * dims, dtype=torch.float64, requires_grad=True)
    fused = norm_act if path == "norm_act" else blocks._batch_norm_act
    y = fused(block.norm, block.act, block.conv(x))
    y_ref = nn.functional.leaky_relu(block.norm(block.conv(x)), 0.2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    params = [x] + list(block.parameters())
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the in-place activation is not applied to a view, so autograd does not rebuild a base
    assert "CopySlices" not in graph_nodes(y)


def test_norm_act_falls_back_for_other_modules():
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(norm_act(nn.BatchNorm2d(3), nn.ReLU(), x), nn.ReLU()(nn.BatchNorm2d(3)(x)))
