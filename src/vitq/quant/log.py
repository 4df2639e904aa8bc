"""Logarithmic quantizer kinds for power-law activations: log√2 (RepQ-ViT) and adaptive-base log (AdaLog's idea).

Both use all ``2^b`` codes strictly: codes ``0 .. 2^b - 2`` are levels and the last code is the value 0, so a
b-bit tensor needs exactly b bits per element. Rounding is to the nearest code in the log domain (like the
``log2`` kind), which is monotone non-decreasing and maps every level to itself.

- ``logsqrt2``: levels ``scale · 2^(-k/2)`` for post-softmax values in [0, 1] (scale 1 by default, so 1.0 is
  code 0; searched per layer by :meth:`LogSqrt2Quantizer.fit`). Hardware form: the code k is a log2 code
  ``k >> 1`` plus a parity bit ``k & 1``; the value is ``2^-(k >> 1)`` times 1 or 1/√2, times the layer's
  scale (:meth:`LogSqrt2Quantizer.hardware_decode` computes it that way, and :meth:`fake_quant` uses it).
- ``adalog``: levels ``scale · 2^(-k/r)``; the base ``2^(1/r)`` (buffer ``base_exp`` = r) is searched per layer
  by :meth:`AdaLogQuantizer.fit` (least squared error over every observed value, from the observer's
  histogram, over ``R_GRID``); levels stop at ``scale·2^-64``. For the softmax output the scale stays 1
  (1.0 is exact). For signed inputs (post-GELU, the ``fc2`` input) one bit selects the side: negative values
  get ``2^(b-1) - 1`` uniform steps of ``neg_scale`` (GELU's small negative tail) and 0, positive values
  ``2^(b-1)`` log levels under a searched ``scale``.

Importing this module registers the kinds (``vitq.methods`` imports it).
"""

from __future__ import annotations

import math

import torch

from vitq.quant.base import EPS, Quantizer, register_quantizer

INV_SQRT2 = 1.0 / math.sqrt(2.0)
R_GRID = tuple(round(1.0 + 0.25 * i, 2) for i in range(13))  # r = 1 (log2), 1.25, ..., 4 (base 2^(1/4))
MAX_DEPTH = 64  # deepest adalog level: scale·2^-64
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 2^-126
LOGSQRT2_SCALES = tuple(2.0 ** (-j / 4) for j in range(17))  # logsqrt2 top level: 1, 2^-1/4, ..., 1/16
SCALE_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(12))  # top level as a fraction of the observed max


def _observed_values(obs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-empty bins of an observer's histogram (second pass): (bin centres, counts) on ``device``."""
    centres, counts = obs.histogram()
    keep = counts > 0
    return centres[keep].float().to(device), counts[keep].double().to(device)


def _table(max_code: int, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The value of every code 0 .. max_code + 1 (the last is 0), to look codes up in: the same numbers as
    :meth:`AdaLogQuantizer.level_set` (a power over a large tensor may differ from one over a small tensor in the
    last bit, so the levels are computed once, here, and gathered)."""
    k = torch.arange(max_code + 1, dtype=torch.float32, device=scale.device)
    return torch.cat([scale * torch.pow(2.0, k * (-1.0 / r)), torch.zeros(1, device=scale.device)])


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return xq.detach() + (x - x.detach())


@register_quantizer("logsqrt2")
class LogSqrt2Quantizer(Quantizer):
    """log√2 quantizer for post-softmax values: levels scale·2^(-k/2), k = 0..2^b-2, last code = 0 (RepQ-ViT).

    Code k = a log2 code (k >> 1) and a parity bit (k & 1); ``scale`` (one per layer, default 1 so that 1.0 is
    a level) multiplies the decoded value, i.e. it folds into the dequantization of the ``attn @ v`` product.
    :meth:`fit` searches it over ``LOGSQRT2_SCALES`` for the least squared error over every observed value:
    at 4 bits the levels 1 .. 2^-7 stop above the typical attention weight of a 197-token image (≈ 0.005), and
    a top level below 1 trades the rare near-1 weights for resolution where most weights are."""

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.register_buffer("scale", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "scale", torch.tensor(1.0))  # a state saved before the scale existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def max_code(self) -> int:
        return 2**self.bits - 2

    @staticmethod
    def hardware_decode(code: torch.Tensor) -> torch.Tensor:
        """Value of integer codes k (scale 1): a right shift by ``k >> 1`` and, if the parity bit is set, a
        multiply by 1/√2."""
        code = code.to(torch.int64)
        out = torch.pow(2.0, -(code >> 1).to(torch.float32))
        return torch.where((code & 1) == 1, out * INV_SQRT2, out)

    def encode(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes (0..2^b-1; 2^b-1 means the value 0)."""
        scale = self.scale if scale is None else scale
        pos = x > 0
        k = torch.round(-2.0 * torch.log2(torch.where(pos, x / scale, torch.ones_like(x)).float()))
        k = torch.clamp(k, min=0)
        zero = (~pos) | (k > self.max_code)
        return torch.where(zero, torch.full_like(k, self.max_code + 1), k).to(torch.int64)

    def level_set(self) -> torch.Tensor:
        levels = self.hardware_decode(torch.arange(self.max_code + 1, device=self.scale.device)) * self.scale
        return torch.cat([levels, torch.zeros(1, device=self.scale.device)]).unique()

    def _quant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        code = self.encode(x, scale)
        value = self.hardware_decode(torch.clamp(code, max=self.max_code)).to(scale.device) * scale
        return torch.where(code > self.max_code, torch.zeros((), device=x.device), value)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return _ste(x, self._quant(x, self.scale).to(x.dtype))

    @torch.no_grad()
    def fit(self, obs) -> dict:
        """Search ``scale`` over LOGSQRT2_SCALES for the least squared error over every observed value (the
        observer's histogram from its second pass). Without a histogram the scale stays 1."""
        if getattr(obs, "hist", None) is None:
            self.mark_initialized()
            return {"scale": float(self.scale)}
        x, wts = _observed_values(obs, self.scale.device)
        errs = [float(((self._quant(x, torch.tensor(s, device=x.device)) - x).double().pow(2) * wts).sum())
                for s in LOGSQRT2_SCALES]
        best = LOGSQRT2_SCALES[min(range(len(errs)), key=errs.__getitem__)]
        self.scale.fill_(best)
        self.mark_initialized()
        return {"scale": best}


@register_quantizer("adalog")
class AdaLogQuantizer(Quantizer):
    """Adaptive-base log quantizer (AdaLog's idea): levels scale·2^(-k/r), base 2^(1/r) searched per layer.

    Signed inputs (post-GELU) add a uniform negative side."""

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.register_buffer("base_exp", torch.tensor(2.0))  # r: levels 2^(-k/r); r = 2 is log√2
        self.register_buffer("scale", torch.tensor(1.0))  # the top level
        self.register_buffer("neg_scale", torch.tensor(0.0))  # 0 = unsigned (softmax); > 0 = signed (post-GELU)

    @property
    def signed(self) -> bool:
        return bool(self.neg_scale > 0)

    def _codes(self) -> tuple[int, int]:
        """(largest log code, number of negative uniform steps). Log levels stop at scale·2^-MAX_DEPTH (deeper
        ones are useless and underflow float32), so a small base at 8 bits leaves some codes unused."""
        depth = int(math.floor(MAX_DEPTH * float(self.base_exp)))
        if self.signed:
            return min(2 ** (self.bits - 1) - 1, depth), 2 ** (self.bits - 1) - 1
        return min(2**self.bits - 2, depth), 0

    def _log_part(self, x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, max_code: int) -> torch.Tensor:
        """The positive side: code k = round(r·log2(scale / x)) clipped to 0 .. max_code + 1, level
        scale·2^(-k/r), and 0 for code max_code + 1 (values below the deepest level's rounding point). Every
        x ≤ TINY (x ≤ 0 included) takes code max_code + 1: with scale ≥ EPS = 2^-26.6, r·log2(scale / TINY) ≥
        99·r exceeds the deepest code 64·r. (Clamping to TINY, not 0, keeps log2 off its slow path for zeros
        and subnormals; with the levels looked up in a table of 2^b values it is 2.5 times as fast, and it runs on
        every attention map. pow and index_select, not exp2 and take: the fake quantization is traced into ONNX for
        the kinds without a QDQ form.)"""
        k = torch.round(r * (torch.log2(scale) - torch.log2(x.clamp_min(TINY)))).clamp_(0, max_code + 1)
        return _table(max_code, r, scale).index_select(0, k.reshape(-1).long()).reshape(k.shape)

    def _quant(self, x: torch.Tensor, r, scale, neg_scale) -> torch.Tensor:
        max_code, neg_steps = self._codes()
        out = self._log_part(x, r, scale, max_code)
        if neg_steps:
            neg = -torch.clamp(torch.round(-x / neg_scale), 0, neg_steps) * neg_scale
            out = torch.where(x < 0, neg, out)
        return out

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return _ste(x, self._quant(x.float(), self.base_exp, self.scale, self.neg_scale).to(x.dtype))

    def level_set(self) -> torch.Tensor:
        max_code, neg_steps = self._codes()
        levels = [_table(max_code, self.base_exp, self.scale)]
        if neg_steps:
            m = torch.arange(1, neg_steps + 1, dtype=torch.float32, device=self.scale.device)
            levels.append(-m * self.neg_scale)
        return torch.cat(levels).unique()

    def set_range(self, lo, hi) -> None:
        """Without a sample: top level at ``hi`` (softmax: 1), negative steps cover ``lo``; base kept."""
        hi = max(float(hi), EPS)
        self.scale.fill_(1.0 if self.role == "softmax" else hi)
        if self.role != "softmax" and float(lo) < 0:
            self.neg_scale.fill_(max(-float(lo) / (2 ** (self.bits - 1) - 1), EPS))
        self.mark_initialized()

    @torch.no_grad()
    def fit(self, obs) -> dict:
        """Search the base (and, for non-softmax inputs, the top level) for the least squared error over every
        observed value (the observer's histogram from its second pass); the negative side (if any) covers the
        observed minimum. Without a histogram only the range is set (base kept)."""
        lo, hi = min(obs.min, 0.0), max(obs.max, EPS)
        if getattr(obs, "hist", None) is None:
            self.set_range(lo, hi)
            return {"base_exp": float(self.base_exp), "scale": float(self.scale)}
        x, wts = _observed_values(obs, self.scale.device)
        if self.role == "softmax":
            scales = [1.0]
            self.neg_scale.fill_(0.0)
        else:
            scales = [hi * f for f in SCALE_GRID]
            self.neg_scale.fill_(max(-lo / (2 ** (self.bits - 1) - 1), EPS) if lo < 0 else 0.0)
        best = None
        for r in R_GRID:
            for s in scales:
                xq = self._quant(x, torch.tensor(r), torch.tensor(s), self.neg_scale)
                err = float(((xq - x).double().pow(2) * wts).sum())
                if best is None or err < best[0]:
                    best = (err, r, s)
        self.base_exp.fill_(best[1])
        self.scale.fill_(best[2])
        self.mark_initialized()
        return {"base_exp": best[1], "scale": best[2]}


@register_quantizer("adalog_shift")
class AdaLogShiftQuantizer(AdaLogQuantizer):
    """Adaptive-base log quantizer for post-GELU values, shifted (AdaLog's form): the input is moved up by
    ``shift`` (the depth of GELU's negative tail, about 0.17) so that every value is ≥ 0, quantized with all
    ``2^b - 1`` log levels ``scale · 2^(-k/r)`` and the zero code, and moved back. No code is spent on a sign:
    at 4 bits 15 levels instead of the signed ``adalog``'s 8 log levels and 7 negative steps. The lowest value
    (code "zero") is ``-shift``, GELU's minimum. In integer arithmetic the shift folds into the next layer's
    bias (``b - Ŵ · shift · 1``); the fake-quantized value here is the same number."""

    def __init__(self, bits: int, role: str):
        super().__init__(bits, role)
        self.register_buffer("shift", torch.tensor(0.0))

    @property
    def signed(self) -> bool:
        return False

    def _codes(self) -> tuple[int, int]:
        depth = int(math.floor(MAX_DEPTH * float(self.base_exp)))
        return min(2**self.bits - 2, depth), 0

    def _quant(self, x: torch.Tensor, r, scale, neg_scale, shift=None) -> torch.Tensor:
        shift = self.shift if shift is None else shift
        return self._log_part(x + shift, r, scale, self._codes()[0]) - shift

    def level_set(self) -> torch.Tensor:
        return (_table(self._codes()[0], self.base_exp, self.scale) - self.shift).unique()

    def set_range(self, lo, hi) -> None:
        """Without a sample: the shift covers ``lo``, the top level is ``hi`` (base kept)."""
        self.shift.fill_(max(-float(lo), 0.0))
        self.scale.fill_(max(float(hi) + float(self.shift), EPS))
        self.neg_scale.fill_(0.0)
        self.mark_initialized()

    @torch.no_grad()
    def fit(self, obs) -> dict:
        """The shift from the observed minimum; the base and the top level searched for the least squared error
        over every observed value (the observer's histogram), as :meth:`AdaLogQuantizer.fit`."""
        lo, hi = min(obs.min, 0.0), max(obs.max, EPS)
        if getattr(obs, "hist", None) is None:
            self.set_range(lo, hi)
            return {"base_exp": float(self.base_exp), "scale": float(self.scale), "shift": float(self.shift)}
        x, wts = _observed_values(obs, self.scale.device)
        shift = -lo
        self.shift.fill_(shift)
        self.neg_scale.fill_(0.0)
        best = None
        for r in R_GRID:
            for f in SCALE_GRID:
                s = (hi + shift) * f
                xq = self._quant(x, torch.tensor(r), torch.tensor(s), self.neg_scale)
                err = float(((xq - x).double().pow(2) * wts).sum())
                if best is None or err < best[0]:
                    best = (err, r, s)
        self.base_exp.fill_(best[1])
        self.scale.fill_(best[2])
        self.mark_initialized()
        return {"base_exp": best[1], "scale": best[2], "shift": shift}
