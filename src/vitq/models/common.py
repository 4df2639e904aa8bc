"""Pieces shared by the family modules: swapping Conv2d/Linear for their quantized versions, quantizing a
unit's output, and the small random input a family traces its model with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.quant.modules import QConv2d, QLinear, activation_quantizer
from vitq.scheme import Scheme


class QConv2dSame(QConv2d):
    """Built from timm's ``Conv2dSame`` (TensorFlow 'SAME' padding, computed from the input size): the input
    is quantized, then zero-padded by :meth:`input_pads` (zero is on every quantization grid), then convolved
    without padding. ``padded_conv``: the forward is exactly that, so an exporter may rebuild it as one
    convolution with the pads of its (static) input size."""

    padded_conv = True

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, signed_weights: bool, input_role: str,
                 scheme: Scheme | None = None):
        super().__init__(conv, w_bits, a_bits, signed_weights, input_role, scheme)
        self.kernel_size = conv.kernel_size

    def input_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding of an input of ``height`` x ``width``, as TensorFlow's 'SAME'
        (and timm's ``pad_same``): the output has ceil(size / stride) positions, the total padding that needs is
        split in two with the odd one at the end."""

        def total(size: int, k: int, s: int, d: int) -> int:
            return max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)

        ph = total(int(height), self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = total(int(width), self.kernel_size[1], self.stride[1], self.dilation[1])
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.input_quant(x), self.input_pads(x.shape[-2], x.shape[-1]))
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_same_class():
    from timm.layers import Conv2dSame

    return Conv2dSame


def _plain_linear(cls: type) -> bool:
    """nn.Linear, or timm's ``Linear`` (the same computation, only casting the weight to the input dtype)."""
    from timm.layers import Linear as TimmLinear

    return cls.forward is nn.Linear.forward or cls is TimmLinear


def quantized_weighted(name: str, module: nn.Module, scheme, image: bool = False) -> nn.Module | None:
    """The quantized replacement of a Conv2d/Linear (None for other modules). A subclass with a forward of
    its own (e.g. weight standardization) is refused by name rather than silently computed as a plain one."""
    w, a, _ = scheme.bits_for(name)
    role, a = ("image", scheme.input_bits) if image else ("linear_input", a)
    if isinstance(module, nn.Conv2d):
        if type(module) is _conv_same_class():
            return QConv2dSame(module, w, a, scheme.signed_weights, role, scheme)
        if type(module).forward is not nn.Conv2d.forward:
            raise VitqError(f"unsupported convolution {name} ({type(module).__name__}: a Conv2d with its own "
                            "forward); supported: nn.Conv2d, timm Conv2dSame")
        return QConv2d(module, w, a, scheme.signed_weights, role, scheme)
    if isinstance(module, nn.Linear):
        if not _plain_linear(type(module)):
            raise VitqError(f"unsupported linear layer {name} ({type(module).__name__}: a Linear with its own "
                            "forward); supported: nn.Linear")
        return QLinear(module, w, a, scheme.signed_weights, scheme)
    return None


def swap_weighted(model: nn.Module, scheme, image_layers: set[str] = frozenset(), skip=()) -> None:
    """Replace every Conv2d/Linear of ``model`` (except inside modules of the types in ``skip``, which
    their own quantized class handles) by its quantized version."""
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, (QConv2d, QLinear)):
            continue
        new = quantized_weighted(name, module, scheme, image=name in image_layers)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def _quantize_output(module: nn.Module, args, output):
    return module.out_quant(output)


def quantize_unit_output(unit: nn.Module, bits: int, scheme: Scheme) -> None:
    """Quantize what a unit hands on (under ``fq`` the residual stream between blocks): a per-tensor
    quantizer ``out_quant`` (role ``residual``) held by the unit, so its state is in the state dict, applied
    by a forward hook so the unit's own forward is left as it is."""
    unit.out_quant = activation_quantizer(scheme, bits, "residual")
    unit.register_forward_hook(_quantize_output)


def example_input(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
