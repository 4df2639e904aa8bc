"""The uniform quantizer kinds: affine ``uniform`` (per tensor or per channel), FQ-ViT's power-of-two-factor
``ptf`` for LayerNorm inputs, and the parameter-free ``log2`` for post-softmax values."""

from __future__ import annotations

import torch

from vitq.quant.base import EPS, Quantizer, int_range, register_quantizer, round_ste


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    """Affine uniform quantizer: signed symmetric (``int``, zero point 0) or unsigned asymmetric (``uint``).

    ``channel_axis`` None means one scale per tensor; otherwise ``num_channels`` scales along that axis
    (per output channel for weights, per head for attention tensors).
    """

    def __init__(self, bits: int, role: str, signed: bool = False, channel_axis: int | None = None,
                 num_channels: int = 1):
        super().__init__(bits, role)
        self.signed = bool(signed)
        self.channel_axis = channel_axis
        self.qmin, self.qmax = int_range(self.bits, self.signed)
        shape = (num_channels,) if channel_axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def init_kwargs(self) -> dict:
        return {"signed": self.signed, "channel_axis": self.channel_axis, "num_channels": self.scale.numel()}

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return t
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.view(shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self._view(self.scale, x)
        z = self._view(self.zero_point, x)
        q = torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point that cover [lo, hi] (zero always included, so 0 is exact)."""
        lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
        hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
        if self.signed:
            scale = torch.maximum(-lo, hi) / self.qmax
            scale = torch.clamp(scale, min=EPS)
            return scale, torch.zeros_like(scale)
        scale = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=EPS)
        zero = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        return scale, zero

    def set_range(self, lo, hi) -> None:
        scale, zero = self.params_for_range(lo, hi)
        self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale))
        self.zero_point.copy_(zero.reshape(self.zero_point.shape).to(self.zero_point))
        self.mark_initialized()

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_axis is None else f"axis {self.channel_axis} x{self.scale.numel()}"
        return f"{super().extra_repr()}, {'int' if self.signed else 'uint'}, per {gran}"


@register_quantizer("log2")
class Log2Quantizer(Quantizer):
    """Log2 quantizer for post-softmax values in [0, 1]: x̂ = 2^-code, code = round(-log2 x) in [0, 2^b - 1];
    values below the smallest level (code > 2^b - 1) and exact zeros become 0. No parameters to calibrate."""

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        code = torch.round(-torch.log2(torch.where(x > 0, x, torch.ones_like(x))))
        out = torch.pow(2.0, -torch.clamp(code, min=0))
        out = torch.where((code > levels) | (x <= 0), torch.zeros_like(out), out)
        return out.detach() + (x - x.detach())  # the level exactly, with a straight-through gradient


@register_quantizer("ptf")
class PTFQuantizer(Quantizer):
    """Power-of-two-factor quantizer (FQ-ViT) for tensors entering a LayerNorm: one global unsigned scale ``s``
    and zero point, and each channel (last axis) uses ``s * 2^-k`` with ``k`` in {0..max_shift}, so an
    integer LayerNorm can undo the factor with a bit shift."""

    def __init__(self, bits: int, role: str, num_channels: int, max_shift: int = 3):
        super().__init__(bits, role)
        self.qmin, self.qmax = int_range(self.bits, False)
        self.max_shift = int(max_shift)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("shift", torch.zeros(num_channels))

    def init_kwargs(self) -> dict:
        return {"num_channels": self.shift.numel(), "max_shift": self.max_shift}

    def channel_scale(self) -> torch.Tensor:
        return self.scale * torch.pow(2.0, -self.shift)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self.channel_scale()
        q = torch.clamp(round_ste(x / s) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * s

    def global_params(self, lo, hi) -> tuple[float, float]:
        """The global (shift 0) scale and zero point that cover [lo, hi], zero included."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / (self.qmax - self.qmin), EPS)
        return scale, min(max(round(self.qmin - lo / scale), self.qmin), self.qmax)

    def set_range(self, lo, hi, channel_min: torch.Tensor | None = None, channel_max: torch.Tensor | None = None,
                  channel_errors: torch.Tensor | None = None) -> None:
        """Global scale from [lo, hi], then a shift per channel: with ``channel_errors`` ([max_shift + 1, C],
        each channel's squared error at each shift over the calibration data, see
        :class:`vitq.quant.observers.Observer`), the shift with the lowest error (FQ-ViT's rule); else, with the
        channel's observed range, the finest shift whose grid still covers it (never clips a channel)."""
        scale, zero = self.global_params(lo, hi)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero)
        self.shift.zero_()
        if channel_errors is not None:
            if tuple(channel_errors.shape) != (self.max_shift + 1, self.shift.numel()):
                raise ValueError(f"channel_errors of shape {tuple(channel_errors.shape)} (expected "
                                 f"{(self.max_shift + 1, self.shift.numel())})")
            self.shift.copy_(channel_errors.argmin(0).to(self.shift))
        elif channel_min is not None and channel_max is not None:
            cmin = channel_min.to(self.shift.device, torch.float32)
            cmax = channel_max.to(self.shift.device, torch.float32)
            for k in range(1, self.max_shift + 1):
                s = scale * 2.0**-k
                fits = ((self.qmin - zero) * s <= cmin) & ((self.qmax - zero) * s >= cmax)
                self.shift.copy_(torch.where(fits, torch.full_like(self.shift, k), self.shift))
        self.mark_initialized()
