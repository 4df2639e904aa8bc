"""The autograd functions the export forms trace into ONNX nodes: fake quantization as [Clip] ->
QuantizeLinear -> DequantizeLinear, integer weight codes -> DequantizeLinear, and a convolution with
asymmetric zero pads as one Conv node. Each computes in PyTorch what its nodes compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class QDQFn(torch.autograd.Function):
    """Fake quantization that exports as [Clip] -> QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero, dq_scale, lo, hi, axis: int, qmin: int, qmax: int):
        shape = [1] * x.dim()
        if axis >= 0:
            shape[axis] = -1
        s, z, ds = scale.view(shape), zero.to(x.dtype).view(shape), dq_scale.view(shape)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return (q - z) * ds

    @staticmethod
    def symbolic(g, x, scale, zero, dq_scale, lo, hi, axis: int, qmin: int, qmax: int):
        kw = {"axis_i": axis} if axis >= 0 else {}
        if lo is not None:
            if axis >= 0:  # Clip takes scalars only; per-channel bounds as Max/Min
                x = g.op("Min", g.op("Max", x, lo), hi)
            else:
                x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero, **kw)
        return g.op("DequantizeLinear", q, dq_scale, zero, **kw)


class DQFn(torch.autograd.Function):
    """Integer codes (a constant) -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero, axis: int):
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.float() - zero.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero, axis: int):
        out = g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)
        out.setType(codes.type().with_dtype(torch.float32))  # Conv's exporter needs the kernel shape
        return out


class PaddedConvFn(torch.autograd.Function):
    """A convolution of ``x`` zero-padded by ``pads`` (left, right, top, bottom), exported as one Conv node with
    those pads (ONNX takes them asymmetric; torch's exporter only symmetric ones)."""

    @staticmethod
    def forward(ctx, x, w, b, kernel, stride, pads, dilation, groups: int):
        return F.conv2d(F.pad(x, pads), w, b, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, w, b, kernel, stride, pads, dilation, groups: int):
        left, right, top, bottom = pads
        args = (x, w) if b is None else (x, w, b)
        return g.op("Conv", *args, kernel_shape_i=list(kernel), strides_i=list(stride),
                    pads_i=[top, left, bottom, right], dilations_i=list(dilation), group_i=groups)
