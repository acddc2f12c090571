"""Building blocks shared by all backbones: dimension-generic conv / norm / activation.

Every backbone of the paper uses Conv + InstanceNorm + LeakyReLU(0.2) with reflect padding;
`dims` selects 2D or 3D so the same code serves both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _depth_halves(x: Tensor, weight: Tensor, stride, dilation) -> tuple[int, int, int] | None:
    """(output half depth, input length, second input start) of the depth split of a single fp32
    volume, or None where it does not apply (a batch, another dtype, an odd output depth)."""
    if x.shape[0] != 1 or x.dtype != torch.float32:
        return None
    span = dilation[0] * (weight.shape[2] - 1) + 1
    out_depth = (x.shape[2] - span) // stride[0] + 1
    if out_depth % 2:
        return None
    half = out_depth // 2
    return half, (half - 1) * stride[0] + span, half * stride[0]


def _valid_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, dilation) -> Tensor:
    """conv3d of an already padded input; a single fp32 CPU volume runs as a depth-split batch of two.

    For a single fp32 volume on the CPU, PyTorch dispatches Conv3d (forward and backward) to
    `slow_conv3d` instead of oneDNN (measured 6-12x slower, forward+backward, 16 channels at
    32^3). The volume is split into two overlapping halves along depth and run as a batch of two,
    which takes the oneDNN path; the halves' outputs are exactly the two halves of the full output.
    """
    split = _depth_halves(x, weight, stride, dilation)
    if split is None:
        return F.conv3d(x, weight, bias, stride, 0, dilation)
    _, length, start = split
    pair = torch.cat([x[:, :, :length], x[:, :, start:start + length]], 0)
    y = F.conv3d(pair, weight, bias, stride, 0, dilation)
    return torch.cat([y[0:1], y[1:2]], 2)


# Up to this many output channels the forward-convolution input gradient is the faster one; wider
# convolutions (16-64 output channels at 20-40^3) were 1.3-1.5x slower that way (2 threads).
NARROW_OUTPUT_CHANNELS = 8


class _CpuConv3dFunction(torch.autograd.Function):
    """conv3d of a padded fp32 CPU input whose input gradient is computed as a forward convolution.

    For a stride-1 convolution the input gradient is the full convolution of the output gradient
    with the flipped kernel, input and output channels swapped. oneDNN runs that forward
    convolution 1.3-3x faster than `convolution_backward`'s input gradient for the narrow
    full-resolution layers of these backbones (<= 8 output channels, 32^3-80^3). The weight and
    bias gradients (and other convolutions' input gradients) stay with `convolution_backward`, on
    the depth halves for a single volume, as the forward ran.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.dilation, ctx.has_bias = stride, dilation, bias is not None
        return _valid_conv3d(x, weight, bias, stride, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, dilation = ctx.stride, ctx.dilation
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = need_b and ctx.has_bias
        grad = grad.contiguous()
        gx = None
        if need_x and all(s == 1 for s in stride) and weight.shape[0] <= NARROW_OUTPUT_CHANNELS:
            pads = []
            for k, d in zip(reversed(weight.shape[2:]), reversed(dilation)):
                pads += [d * (k - 1)] * 2
            flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
            gx = _valid_conv3d(F.pad(grad, pads), flipped, None, (1, 1, 1), dilation)
            need_x = False
        if not (need_x or need_w or need_b):
            return gx, None, None, None, None
        split = _depth_halves(x, weight, stride, dilation)
        if split is not None:
            half, length, start = split
            x_in = torch.cat([x[:, :, :length], x[:, :, start:start + length]], 0)
            g_in = torch.cat([grad[:, :, :half], grad[:, :, half:]], 0)
        else:
            x_in, g_in = x, grad
        gx_in, gw, gb = torch.ops.aten.convolution_backward(
            g_in, x_in, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), [0, 0, 0],
            list(dilation), False, [0, 0, 0], 1, [need_x, need_w, need_b])
        if need_x and split is not None:
            gx = x.new_zeros(x.shape)
            gx[:, :, :length] += gx_in[0:1]
            gx[:, :, start:start + length] += gx_in[1:2]
        elif need_x:
            gx = gx_in
        return gx, gw, gb, None, None


class Conv3d(nn.Conv3d):
    """nn.Conv3d with faster fp32 training steps on the CPU, the same convolution up to float rounding.

    On the CPU in fp32 (not under autocast, groups 1) the input is padded explicitly and the
    convolution runs through `_valid_conv3d` (a batch of one as two depth halves, for oneDNN) and,
    when a gradient is needed, `_CpuConv3dFunction` (the input gradient as a forward convolution).
    Anywhere else (CUDA, bf16 autocast, float64) it is nn.Conv3d.
    """

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.groups != 1
                or torch.is_autocast_enabled("cpu")):
            return super()._conv_forward(x, weight, bias)
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.shape[0] != 1 and not training:
            return super()._conv_forward(x, weight, bias)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        elif any(self.padding):
            pd, ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph, pd, pd))
        if training:
            return _CpuConv3dFunction.apply(x, weight, bias, self.stride, self.dilation)
        return _valid_conv3d(x, weight, bias, self.stride, self.dilation)


def pointwise_conv_one_modality(conv: nn.Module, x: Tensor, present: Tensor, num_modalities: int) -> Tensor:
    """A 1^3 (or 1^2) conv over M stacked modality blocks of C channels, on an input where row p
    holds only modality present[p]: ``x`` [P, C, *S] are that modality's channels, the other M-1
    blocks are zero. Equal to ``conv`` on the zero-filled [P, M*C, *S] input, but only the present
    modality's weight columns are used, so the zeros are neither built nor multiplied.
    """
    p, c = x.shape[:2]
    w = conv.weight.reshape(conv.out_channels, num_modalities, c)
    w = w.index_select(1, present).transpose(0, 1)  # [P, out, C]
    y = torch.bmm(w, x.reshape(p, c, -1))  # autocast casts both, like the conv it replaces
    if conv.bias is not None:
        y = y + conv.bias[None, :, None].to(y.dtype)
    return y.reshape(p, -1, *x.shape[2:])


def conv_cls(dims: int):
    return {2: nn.Conv2d, 3: Conv3d}[dims]


def norm_cls(dims: int):
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]


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
        return self.act(self.norm(self.conv(x)))


def interp_mode(dims: int) -> str:
    """Linear interpolation mode for `dims` spatial dimensions (bilinear / trilinear)."""
    return {2: "bilinear", 3: "trilinear"}[dims]


def upsample_to(x: Tensor, size, align_corners: bool = True) -> Tensor:
    """(Bi/tri)linear resize of x [B, C, *spatial] to `size` (a shape tuple or a reference tensor).

    With align_corners=True this equals the references' ``nn.Upsample(scale_factor=2,
    align_corners=True)`` whenever the size is exactly double, and still works for odd sizes.
    """
    if isinstance(size, Tensor):
        size = size.shape[2:]
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=interp_mode(x.dim() - 2), align_corners=align_corners)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal conv weights, as the paper's backbones initialise them."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight)
