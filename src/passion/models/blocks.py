"""Building blocks shared by all backbones: dimension-generic conv / norm / activation.

Every backbone of the paper uses Conv + InstanceNorm + LeakyReLU(0.2) with reflect padding;
`dims` selects 2D or 3D so the same code serves both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _triple

from .reflect_pad import reflect_pad
from .resize import linear_resize


# PyTorch runs a CPU fp32 Conv3d on a single volume with oneDNN only when C*D*H of its input
# exceeds this; below it, the slow native kernel.
SLOW_CONV3D_MAX_CDH = 20480


class Conv3d(nn.Conv3d):
    """nn.Conv3d with faster CPU fp32 paths: 1x1x1 convolutions as matrix products
    (`pointwise_conv`), the input gradient of narrow convolutions in channels-last order
    (`conv3d`), reflect padding with a cheaper backward (`reflect_pad`), and no slow native
    kernel for a batch of one (below).

    For a single fp32 volume on the CPU, PyTorch runs Conv3d with `slow_conv3d` instead of
    oneDNN when the input's C*D*H is at most 20480 (ATen's `use_mkldnn` rule; measured 3-6x
    slower, forward+backward, e.g. 16 channels at 32^3 or 128 at 10^3). There we split the
    (explicitly padded) volume into two overlapping halves along depth and run them as a batch
    of two, which takes the oneDNN path; the halves' outputs are exactly the two halves of the
    full output, so the result is the same convolution (up to float rounding). Larger volumes
    already take oneDNN, which is 2-30 % faster unsplit.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pointwise = (not isinstance(self.padding, str) and all(p == 0 for p in self.padding)
                           and all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride))

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.groups != 1
                or torch.is_autocast_enabled("cpu")):
            return super()._conv_forward(x, weight, bias)
        if self._pointwise and x.is_contiguous():
            return pointwise_conv(x, weight, bias)
        padding = self.padding
        if self.padding_mode == "reflect":
            x, padding = reflect_pad(x, self._reversed_padding_repeated_twice), 0
        elif self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        if x.shape[0] != 1 or x.shape[1] * x.shape[2] * x.shape[3] > SLOW_CONV3D_MAX_CDH:  # oneDNN already
            return conv3d(x, weight, bias, self.stride, padding, self.dilation)
        if padding and any(padding):
            pd, ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph, pd, pd))
        stride, span = self.stride[0], self.dilation[0] * (self.kernel_size[0] - 1) + 1
        out_depth = (x.shape[2] - span) // stride + 1
        if out_depth % 2:
            return conv3d(x, weight, bias, self.stride, 0, self.dilation)
        half = out_depth // 2
        length = (half - 1) * stride + span
        start = half * stride
        y = conv3d(_DepthHalves.apply(x, length, start), weight, bias, self.stride, 0, self.dilation)
        # transpose + reshape, whose backward is a view, where cat-ing y[0:1] and y[1:2] would
        # build a zero-filled y-sized gradient per slice; contiguous() because with one output
        # plane per half the reshape is a strided view.
        return y.transpose(0, 1).reshape(1, y.shape[1], 2 * y.shape[2], *y.shape[3:]).contiguous()


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1x1 convolution, stride 1, as one batched matrix product per sample: [O, C] @ [C, voxels].

    On the CPU with few channels PyTorch's oneDNN convolution is 4-8x slower forward+backward
    than this (8 -> 8 channels at 80^3, batch 3: 106 ms against 21 ms), and still slower at 64
    channels. The same sums, up to float rounding.
    """
    b, c = x.shape[:2]
    out = weight.shape[0]
    return batched_pointwise(weight.reshape(1, out, c).expand(b, out, c), x, bias)


def batched_pointwise(weights: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    """Row b of x [B, C, *S] through its own 1x1 weight weights[b] [out, C], plus bias [out]:
    [B, out, *S], as one (b)addbmm. Under autocast it is cast like the convolution it replaces."""
    b, c = x.shape[:2]
    out = weights.shape[1]
    flat = x.reshape(b, c, -1)
    y = torch.bmm(weights, flat) if bias is None else torch.baddbmm(bias.reshape(1, out, 1), weights, flat)
    return y.view(b, out, *x.shape[2:])


# oneDNN's AVX-512 convolution kernels work on blocks of 16 channels: an NCDHW gradient with
# fewer output channels is padded to 16 and reordered twice, which makes the input gradient of an
# 8-channel convolution 2-2.5x slower than the same computation on channels-last tensors.
_BLOCK_16_CHANNELS = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """F.conv3d of a CPU fp32 batch that oneDNN runs (not a single small volume, see Conv3d).

    On a CPU whose oneDNN kernels block channels by 16, a convolution with fewer than 16 output
    channels computes its input gradient on channels-last copies of the gradient and the weight
    (measured 8 -> 8 channels at 80^3: 38 -> 16 ms at batch 1, 107 -> 50 ms at batch 3; from 16
    output channels on, NCDHW is as fast or faster). Forward, weight and bias gradients are
    unchanged; the input gradient is the same up to float rounding.
    """
    if (_BLOCK_16_CHANNELS and weight.shape[0] < 16 and x.requires_grad and torch.is_grad_enabled()
            and not isinstance(padding, str)):
        return _ChannelsLastInputGradConv3d.apply(x, weight, bias, stride, padding, dilation)
    return F.conv3d(x, weight, bias, stride, padding, dilation)


class _ChannelsLastInputGradConv3d(torch.autograd.Function):
    """F.conv3d whose backward computes the input gradient in channels-last memory order."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (list(_triple(stride)), list(_triple(padding)), list(_triple(dilation)))  # aten's form
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return F.conv3d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        backward = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        if need_x:
            cl = torch.channels_last_3d
            # the input gradient needs only the input's shape: an uninitialised channels-last stand-in
            shape_only = torch.empty(x.shape, dtype=x.dtype, memory_format=cl)
            gx = backward(grad.contiguous(memory_format=cl), shape_only, weight.contiguous(memory_format=cl),
                          None, stride, padding, dilation, False, [0, 0, 0], 1, [True, False, False])[0]
            gx = gx.contiguous()
        if need_w or need_b:
            _, gw, gb = backward(grad, x, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0, 0], 1,
                                 [False, need_w, need_b])
        return gx, gw, gb, None, None, None


class _DepthHalves(torch.autograd.Function):
    """x [1, C, D, ...] -> its depth windows [0, length) and [start, start + length) as a batch
    of two. The backward writes each plane's gradient once; slicing + cat would zero-fill a full
    x-sized gradient per window and add them."""

    @staticmethod
    def forward(ctx, x: Tensor, length: int, start: int) -> Tensor:
        ctx.shape, ctx.length, ctx.start = x.shape, length, start
        return torch.cat([x[:, :, :length], x[:, :, start:start + length]], 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        length, start = ctx.length, ctx.start
        first, second = grad[0:1], grad[1:2]
        overlap = length - start
        if overlap < 0:  # a gap between the windows (stride > kernel span)
            gx = grad.new_zeros(ctx.shape)
            gx[:, :, :length] = first
            gx[:, :, start:start + length] = second
            return gx, None, None
        gx = grad.new_empty(ctx.shape)
        gx[:, :, :start] = first[:, :, :start]
        torch.add(first[:, :, start:], second[:, :, :overlap], out=gx[:, :, start:length])
        gx[:, :, length:start + length] = second[:, :, overlap:]
        gx[:, :, start + length:] = 0
        return gx, None, None


def pointwise_conv_one_modality(conv: nn.Module, x: Tensor, present: Tensor, num_modalities: int) -> Tensor:
    """A 1^3 (or 1^2) conv over M stacked modality blocks of C channels, on an input where row p
    holds only modality present[p]: ``x`` [P, C, *S] are that modality's channels, the other M-1
    blocks are zero. Equal to ``conv`` on the zero-filled [P, M*C, *S] input, but only the present
    modality's weight columns are used, so the zeros are neither built nor multiplied.
    """
    w = conv.weight.reshape(conv.out_channels, num_modalities, x.shape[1])
    return batched_pointwise(w.index_select(1, present).transpose(0, 1), x, conv.bias)  # w: [P, out, C]


def conv_cls(dims: int):
    return {2: nn.Conv2d, 3: Conv3d}[dims]


def norm_cls(dims: int):
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]


def norm_act(norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(norm(x))`` for an InstanceNorm without running stats followed by an in-place
    LeakyReLU, with the activation applied in place to the norm's own result (on
    ``F.instance_norm``'s [B, C, *S] view of its [1, B*C, *S] batch_norm result, autograd would
    rebuild the view's base in backward: CopySlices + AsStrided).

    On the CPU the norm runs as ``F.group_norm`` with one group per channel: the same
    normalisation (per sample and channel, over the spatial axes; equal up to float rounding),
    2-3x faster forward than the batch_norm on the reshape (two passes over the data against
    three). Elsewhere it stays the measured batch_norm, which also keeps bf16 under CUDA autocast
    (group_norm is autocast to fp32)."""
    if not (isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats
            and isinstance(act, nn.LeakyReLU) and act.inplace):
        return act(norm(x))
    return (_group_norm_act if x.device.type == "cpu" else _batch_norm_act)(norm, act, x)


def _group_norm_act(norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    return F.leaky_relu_(F.group_norm(x, x.shape[1], norm.weight, norm.bias, norm.eps), act.negative_slope)


def _batch_norm_act(norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    b, c = x.shape[:2]
    weight, bias = (norm.weight.repeat(b), norm.bias.repeat(b)) if norm.affine else (None, None)
    y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), None, None, weight, bias, True, 0.0, norm.eps)
    return F.leaky_relu_(y, act.negative_slope).view(x.shape)


class ConvNormAct(nn.Module):
    """conv(k, stride, reflect pad) -> InstanceNorm -> LeakyReLU(0.2).

    ``affine=False`` gives the parameter-free InstanceNorm that the reference code's
    ``normalization(.., 'in')`` builds (RFNet, mmFormer, M2FTrans all use it); the default
    stays affine for backwards compatibility.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
                 dims: int = 3, pad_mode: str = "reflect", norm: bool = True, act: bool = True,
                 bias: bool = True, slope: float = 0.2, affine: bool = True):
        super().__init__()
        padding = (kernel // 2) if padding is None else padding
        self.conv = conv_cls(dims)(in_ch, out_ch, kernel, stride=stride, padding=padding,
                                   padding_mode=pad_mode if padding else "zeros", bias=bias)
        self.norm = norm_cls(dims)(out_ch, affine=affine) if norm else nn.Identity()
        self.act = nn.LeakyReLU(slope, inplace=True) if act else nn.Identity()

    def forward(self, x):
        return norm_act(self.norm, self.act, self.conv(x))

    def one_modality(self, x: Tensor, present: Tensor, num_modalities: int) -> Tensor:
        """The block (a 1^3 conv over M stacked modality blocks) where row p holds only modality
        present[p]; x [P, C, *S] are that modality's channels (see pointwise_conv_one_modality)."""
        return norm_act(self.norm, self.act, pointwise_conv_one_modality(self.conv, x, present, num_modalities))


def postnorm_block(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, dims: int = 3,
                   cls: type[ConvNormAct] = ConvNormAct) -> ConvNormAct:
    """The references' ``general_conv3d``: conv (reflect pad) -> InstanceNorm (no affine) ->
    LeakyReLU(0.2); `cls` may be a ConvNormAct subclass that upsamples or concatenates its inputs
    first (UpsampleConvNormAct / ConcatConvNormAct)."""
    return cls(in_ch, out_ch, kernel, stride=stride, dims=dims, affine=False)


class UpsampleInput:
    """Mixin for a conv block: ``forward(x, size)`` resizes x to `size` first, inside the block, so
    a checkpointed block keeps its coarse input for backward instead of the upsampled one (8x
    smaller in 3D)."""

    def forward(self, x, size):
        return super().forward(linear_resize(x, size))


class ConcatInputs:
    """Mixin for a conv block: ``forward(*xs)`` runs on the channel concatenation of its inputs,
    built inside the block, so a checkpointed block keeps the inputs (alive anyway), not their
    concatenation."""

    def forward(self, *xs):
        return super().forward(torch.cat(xs, dim=1))


class UpsampleConvNormAct(UpsampleInput, ConvNormAct):
    """``linear_resize`` then conv -> norm -> act."""


class ConcatConvNormAct(ConcatInputs, ConvNormAct):
    """conv -> norm -> act of the concatenated inputs."""


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal conv weights, as the paper's backbones initialise them."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight)
