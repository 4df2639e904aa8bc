"""Quantizer kind ``uniform_mixed``: a per-channel uniform quantizer whose channels have their own bit widths.

ACIQ's per-channel bit allocation (Banner et al.) gives every output channel of a weight its own number of
bits; :class:`~vitq.quant.base.UniformQuantizer` has one ``bits`` for all channels. This kind keeps the
per-channel bit widths in a buffer (``channel_bits``, saved with the state), derives each channel's integer
range from it, and otherwise behaves like the per-channel uniform quantizer (same scale / zero-point
buffers, same ``set_range``). ``bits`` is the average bit width the allocation was made for (what the size
summaries read). A saved state is rebuilt by kind through ``init_kwargs`` and loads back exactly.
"""

from __future__ import annotations

import torch

from vitq.quant.base import EPS, register_quantizer, round_ste
from vitq.quant.uniform import UniformQuantizer


@register_quantizer("uniform_mixed")
class MixedUniformQuantizer(UniformQuantizer):
    """Per-channel uniform quantizer with one bit width per channel (buffer ``channel_bits``; ACIQ allocation)."""

    def __init__(self, bits: int, role: str, signed: bool = False, channel_axis: int = 0, num_channels: int = 1):
        if channel_axis is None:
            raise ValueError("uniform_mixed needs a channel axis (one bit width per channel)")
        super().__init__(bits, role, signed=signed, channel_axis=channel_axis, num_channels=num_channels)
        self.register_buffer("channel_bits", torch.full((num_channels,), self.bits, dtype=torch.int64))

    @classmethod
    def from_uniform(cls, q: UniformQuantizer, channel_bits: torch.Tensor) -> MixedUniformQuantizer:
        """A mixed quantizer with the structure of per-channel ``q`` (same sign, axis, channels, device)."""
        new = cls(q.bits, q.role, signed=q.signed, channel_axis=q.channel_axis, num_channels=q.scale.numel())
        new = new.to(q.scale.device)
        new.set_channel_bits(channel_bits)
        return new

    def set_channel_bits(self, channel_bits: torch.Tensor) -> None:
        cb = torch.as_tensor(channel_bits).to(self.channel_bits)
        if cb.shape != self.channel_bits.shape or int(cb.min()) < 1 or int(cb.max()) > 16:
            raise ValueError(f"channel bits of shape {tuple(cb.shape)} in [{int(cb.min())}, {int(cb.max())}] "
                             f"(expected {self.channel_bits.numel()} values in 1..16)")
        self.channel_bits.copy_(cb)

    def channel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer range (qmin, qmax) of every channel, as float tensors [C]."""
        b = self.channel_bits.to(torch.float32)
        if self.signed:
            return -torch.pow(2.0, b - 1), torch.pow(2.0, b - 1) - 1
        return torch.zeros_like(b), torch.pow(2.0, b) - 1

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self._view(self.scale, x)
        z = self._view(self.zero_point, x)
        qmin, qmax = (self._view(t.to(x.dtype), x) for t in self.channel_range())
        q = torch.minimum(torch.maximum(round_ste(x / s) + z, qmin), qmax)
        return (q - z) * s

    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
        hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
        qmin, qmax = (t.to(lo.device) for t in self.channel_range())
        if self.signed:
            scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=EPS)
            return scale, torch.zeros_like(scale)
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
        zero = torch.minimum(torch.maximum(torch.round(qmin - lo / scale), qmin), qmax)
        return scale, zero

    def extra_repr(self) -> str:
        cb = self.channel_bits
        mean = float(cb.float().mean())
        return f"{super().extra_repr()}, channel bits {int(cb.min())}..{int(cb.max())} (mean {mean:.3f})"
