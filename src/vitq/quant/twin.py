"""Extra activation quantizer kinds: twin uniform (PTQ4ViT) for post-softmax and post-GELU values, and MPQ
(the APQ-ViT interpretation of METHODS.md §4) for post-softmax values.

All kinds quantize to the *nearest* representable level of their level set (ties go to the fine region),
so each one is monotone non-decreasing and maps each of its own levels to itself. Parameters live in
buffers (saved with the state); ``init_kwargs`` is empty because the structure depends only on bits/role.
Any of them can be the softmax quantizer of any method: ``Scheme(softmax_quantizer="twin"|"mpq"|...)``.

Importing this module registers the kinds (``vitq.methods`` imports it, so ``vitq.prepare(..., method=...)``
and anything that loads the method registry sees them).
"""

from __future__ import annotations

import torch

from vitq.quant.base import EPS, Quantizer, register_quantizer

MAX_LOG_DEPTH = 64  # deepest log2 level of MPQ's small region: t·2^-64


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Forward exactly ``xq`` (``x + (xq - x)`` can be off by an ulp and break monotonicity), identity
    gradient (straight-through)."""
    return xq.detach() + (x - x.detach())


def _nearest(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise the candidate closer to x; ties go to ``a``."""
    return torch.where((b - x).abs() < (a - x).abs(), b, a)


@register_quantizer("twin")
class TwinSoftmaxQuantizer(Quantizer):
    """Twin uniform quantizer for post-softmax values (PTQ4ViT). One bit selects the range, the other
    ``b-1`` bits give ``L = 2^(b-1) - 1`` steps in it:

    - large range [0, 1]: levels ``m / L`` (1.0 is exact), m = 0..L;
    - small range [0, L·s_small]: levels ``m · s_small``; ``s_small`` (buffer ``small_scale``) is searched.

    PTQ4ViT ties the two scales by a power of two; the searches here use ``s_small = 2^-k / L``
    (:meth:`small_scale_for_shift`), but any positive value works.
    """

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.levels = 2 ** (self.bits - 1) - 1
        self.register_buffer("small_scale", torch.tensor(self.small_scale_for_shift(4)))

    def small_scale_for_shift(self, k: int) -> float:
        """``s_small`` whose range top is ``2^-k`` (k = 0 makes both ranges the same)."""
        return 2.0 ** -k / self.levels

    def set_range(self, lo=None, hi=None) -> None:
        """The small scale is searched, not observed: keep it and mark the quantizer calibrated."""
        self.mark_initialized()

    def level_set(self) -> torch.Tensor:
        m = torch.arange(self.levels + 1, dtype=torch.float32, device=self.small_scale.device)
        return torch.unique(torch.cat([m * self.small_scale, m / self.levels]))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self.small_scale.clamp_min(EPS)
        small = torch.clamp(torch.round(x / s), 0, self.levels) * s
        large = torch.clamp(torch.round(x * self.levels), 0, self.levels) / self.levels
        return _ste(x, _nearest(x, small, large))


@register_quantizer("twin_gelu")
class TwinGeluQuantizer(Quantizer):
    """Twin uniform quantizer for post-GELU values (PTQ4ViT): one bit selects the side, ``L = 2^(b-1) - 1``
    steps per side: negative levels ``-m · neg_scale`` (GELU's small negative tail, fixed from the observed
    minimum) and positive levels ``m · pos_scale`` (searched)."""

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.levels = 2 ** (self.bits - 1) - 1
        self.register_buffer("neg_scale", torch.tensor(0.17 / self.levels))
        self.register_buffer("pos_scale", torch.tensor(1.0))

    def set_range(self, lo, hi) -> None:
        lo = min(float(lo), 0.0)
        hi = max(float(hi), 0.0)
        self.neg_scale.fill_(max(-lo / self.levels, EPS))
        self.pos_scale.fill_(max(hi / self.levels, EPS))
        self.mark_initialized()

    def level_set(self) -> torch.Tensor:
        m = torch.arange(self.levels + 1, dtype=torch.float32, device=self.pos_scale.device)
        return torch.unique(torch.cat([-m * self.neg_scale, m * self.pos_scale]))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        sn, sp = self.neg_scale.clamp_min(EPS), self.pos_scale.clamp_min(EPS)
        neg = -torch.clamp(torch.round(-x / sn), 0, self.levels) * sn
        pos = torch.clamp(torch.round(x / sp), 0, self.levels) * sp
        return _ste(x, torch.where(x < 0, neg, pos))


@register_quantizer("mpq")
class MPQQuantizer(Quantizer):
    """Matthew-effect preserving quantizer for post-softmax values (APQ-ViT, interpretation of METHODS.md
    §4). One bit selects the region, the other ``b-1`` bits give ``L = 2^(b-1) - 1`` steps in it:

    - large region [t', 1], uniform: levels ``1 - (1 - t)·n/L``, n = 0..L (1.0 exact; t' = 1 - (1 - t) is
      t up to rounding), so the few large probabilities keep a fine uniform grid;
    - small region [0, t'), log2: levels ``t'·2^-j``, j = 1..min(L, 64), and 0 below the last one (rounded
      in the log domain, like the log2 quantizer), so the many small ones keep relative precision. (At 8
      bits L = 127; levels under t·2^-64 ~ 1e-20 are useless and underflow float32, so the depth stops at 64.)

    The threshold ``t`` (buffer ``threshold``) is searched per layer by the calibration method.
    """

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.levels = 2 ** (self.bits - 1) - 1
        self.log_depth = min(self.levels, MAX_LOG_DEPTH)
        self.register_buffer("threshold", torch.tensor(0.25))

    def set_range(self, lo=None, hi=None) -> None:
        """The threshold is searched, not observed: keep it and mark the quantizer calibrated."""
        self.mark_initialized()

    def _width(self) -> torch.Tensor:
        return (1.0 - self.threshold).clamp(EPS, 1.0)

    def _uniform_level(self, w: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return 1.0 - w * n / self.levels

    def level_set(self) -> torch.Tensor:
        w = self._width()
        n = torch.arange(self.levels + 1, dtype=torch.float32, device=w.device)
        base = self._uniform_level(w, torch.full_like(w, self.levels))
        j = torch.arange(1, self.log_depth + 1, dtype=torch.float32, device=w.device)
        return torch.unique(torch.cat([self._uniform_level(w, n), base * torch.pow(2.0, -j),
                                       torch.zeros(1, device=w.device)]))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        w = self._width()
        n = torch.clamp(torch.round((1.0 - x) * self.levels / w), 0, self.levels)
        uniform = self._uniform_level(w, n)
        base = self._uniform_level(w, torch.full_like(w, self.levels))  # lowest uniform level, bit-identical
        code = torch.round(-torch.log2(torch.clamp(x, min=1e-30) / base.clamp_min(1e-30)))
        log = base * torch.pow(2.0, -torch.clamp(code, min=0))
        log = torch.where((code > self.log_depth) | (x <= 0), torch.zeros_like(log), log)
        return _ste(x, torch.where(x >= base, uniform, log))
