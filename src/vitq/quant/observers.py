"""Range estimation from calibration data: min/max, percentile and OMSE, over *every value* of *all*
calibration batches.

An :class:`Observer` is attached to a quantizer inside :func:`observing`. The first pass over the calibration
images records the running min/max (per channel too, where the quantizer has channels) and, when asked,
per-batch percentiles. Range searches need a second pass (:func:`observe_errors`), in which the observer, now
knowing the whole range, accumulates what the search needs from every value: a fine histogram (per channel
where the quantizer has channels) for OMSE, and for a PTF quantizer each channel's squared error at each
power-of-two shift (FQ-ViT's rule). Nothing is sampled, so a range no longer depends on a random draw, and
the rare outlier tokens of the residual stream are never missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitq.quant.base import Quantizer, quantizers_of
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer

# OMSE shrink factors 1.00, 0.99, ..., 0.11 of the observed range (METHODS.md §1)
OMSE_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(90))
# "mse" search: each end of the range scaled by the OMSE factors, then on geometrically down to 0.01
MSE_FACTORS = OMSE_FACTORS + tuple(0.11 * (0.01 / 0.11) ** (i / 50) for i in range(1, 51))
MSE_ROUNDS = 2  # upper end, lower end, upper, lower: rounds of the coordinate search
HIST_BINS = 4096  # per tensor (or per channel) over its observed range: 16 bins per 8-bit step, 256 per 4-bit step
# "quantiles" rule (RepQ-ViT's activation and weight initialisation): of the ranges between the (1 - p) and p
# quantiles for these p, the one with the least squared error over every value
QUANTILES = (0.999, 0.9999, 0.99999)


class Observer:
    """``channel_axis`` None: per-tensor statistics. Otherwise statistics per channel along that axis too.
    ``ptf``: the observer of a PTF quantizer (its second pass collects per-channel shift errors)."""

    def __init__(self, channel_axis: int | None = None, percentile: float | None = None,
                 channel_percentile: bool = False, ptf: bool = False):
        self.channel_axis = channel_axis
        self.channel_percentile = channel_percentile and channel_axis is not None
        self.percentile = percentile
        self.ptf = ptf
        self.min = float("inf")
        self.max = float("-inf")
        self.channel_min: torch.Tensor | None = None  # exact per-channel range (channel_axis only)
        self.channel_max: torch.Tensor | None = None
        self.pct_lo: list = []  # per batch: floats, or per-channel tensors
        self.pct_hi: list = []
        self.batches = 0
        # second pass (see start_error_pass)
        self.error_pass = False
        self.hist: torch.Tensor | None = None  # [bins] or [C, bins] counts over [hist_lo, hist_hi]
        self.hist_lo: torch.Tensor | None = None
        self.hist_hi: torch.Tensor | None = None
        self.shift_errors: torch.Tensor | None = None  # PTF: [max_shift + 1, C] summed squared errors
        self._ptf_params: tuple | None = None

    @property
    def per_channel(self) -> bool:
        return self.channel_axis is not None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [n, C] (channels last) for per-channel statistics, or flat."""
        if not self.per_channel:
            return x.reshape(-1)
        flat = x.movedim(self.channel_axis, -1)
        return flat.reshape(-1, flat.shape[-1])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.error_pass:
            self._accumulate(x)
            return
        self.batches += 1
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        flat = self._rows(x)
        if self.per_channel:
            cmin, cmax = flat.min(0).values.cpu(), flat.max(0).values.cpu()
            first = self.channel_min is None
            self.channel_min = cmin if first else torch.minimum(self.channel_min, cmin)
            self.channel_max = cmax if first else torch.maximum(self.channel_max, cmax)
        if self.percentile is not None:  # per channel, or over the whole tensor
            v = flat if self.channel_percentile else x.reshape(-1)
            n = v.shape[0]
            k_hi = min(n, max(1, int(round(self.percentile * n))))
            k_lo = max(1, n - k_hi + 1)
            hi, lo = v.kthvalue(k_hi, dim=0).values.cpu(), v.kthvalue(k_lo, dim=0).values.cpu()
            self.pct_hi.append(hi if self.channel_percentile else float(hi))
            self.pct_lo.append(lo if self.channel_percentile else float(lo))

    # ------------------------------------------------------------------------------------ second pass
    def start_error_pass(self, q: Quantizer | None = None) -> None:
        """Switch to the second pass: the range is now known, so histograms (or PTF shift errors) can be
        accumulated exactly. ``q`` (a PTFQuantizer) fixes the global scale the shifts are measured against."""
        if self.batches == 0:
            raise ValueError("the observer has seen no data (run the first pass before the error pass)")
        self.error_pass = True
        if self.ptf:
            if not isinstance(q, PTFQuantizer):
                raise ValueError("a PTF observer's error pass needs its PTFQuantizer")
            scale, zero = q.global_params(self.min, self.max)
            self._ptf_params = (scale, zero, q.qmin, q.qmax, q.max_shift)
            self.shift_errors = torch.zeros(q.max_shift + 1, self.channel_min.numel(), dtype=torch.float64)
        elif self.per_channel:
            self.hist_lo, self.hist_hi = self.channel_min.clone(), self.channel_max.clone()
            self.hist = torch.zeros(self.channel_min.numel(), HIST_BINS, dtype=torch.float64)
        else:
            self.hist_lo, self.hist_hi = torch.tensor(self.min), torch.tensor(self.max)
            self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)

    def _accumulate(self, x: torch.Tensor) -> None:
        flat = self._rows(x)
        if self.ptf:
            scale, zero, qmin, qmax, max_shift = self._ptf_params
            for k in range(max_shift + 1):
                s = scale * 2.0**-k
                xq = (torch.clamp(torch.round(flat / s) + zero, qmin, qmax) - zero) * s
                self.shift_errors[k] += (xq - flat).pow(2).sum(0).double().cpu()
            return
        lo, hi = self.hist_lo.to(flat.device), self.hist_hi.to(flat.device)
        width = torch.clamp((hi - lo) / HIST_BINS, min=1e-12)
        idx = torch.clamp(((flat - lo) / width).long(), 0, HIST_BINS - 1)
        if self.per_channel:
            offset = torch.arange(flat.shape[1], device=flat.device) * HIST_BINS
            counts = torch.bincount((idx + offset).reshape(-1), minlength=flat.shape[1] * HIST_BINS)
            self.hist += counts.view(flat.shape[1], HIST_BINS).double().cpu()
        else:
            self.hist += torch.bincount(idx, minlength=HIST_BINS).double().cpu()

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin centres, counts), each [bins] or [C, bins]."""
        if self.hist is None:
            raise ValueError("OMSE needs the observer's second pass (vitq.quant.observers.observe_errors)")
        steps = (torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) / HIST_BINS
        lo, hi = self.hist_lo.double(), self.hist_hi.double()
        if self.per_channel:
            centres = lo[:, None] + (hi - lo)[:, None] * steps
        else:
            centres = lo + (hi - lo) * steps
        return centres, self.hist


def _observer_axis(q: Quantizer) -> int | None:
    if isinstance(q, PTFQuantizer):
        return -1
    return getattr(q, "channel_axis", None)


def make_observer(q: Quantizer, percentile: float | None = None) -> Observer:
    axis = _observer_axis(q)
    return Observer(channel_axis=axis, percentile=percentile, ptf=isinstance(q, PTFQuantizer),
                    channel_percentile=isinstance(q, UniformQuantizer) and axis is not None)


@contextmanager
def observing(model: nn.Module, names: Iterable[str] | None = None, percentile: float | None = None,
              seed: int = 0) -> Iterator[dict[str, Observer]]:
    """Attach a fresh observer to each chosen quantizer (default: every non-weight quantizer); while inside,
    those quantizers pass values through unchanged. Yields {name: observer}. (``seed`` is kept for callers;
    nothing is sampled any more.)"""
    qs = quantizers_of(model)
    chosen = list(names) if names is not None else [n for n, q in qs.items() if q.role != "weight"]
    obs = {}
    for n in chosen:
        obs[n] = make_observer(qs[n], percentile)
        qs[n].observer = obs[n]
    try:
        yield obs
    finally:
        for n in chosen:
            qs[n].observer = None


def needs_error_pass(q: Quantizer, how: str) -> bool:
    """Whether setting ``q`` by ``how`` needs the observer's second pass."""
    searched = how in ("omse", "mse", "quantiles") and isinstance(q, (UniformQuantizer, PTFQuantizer))
    return searched or hasattr(q, "fit")  # fit: adalog, logsqrt2


def start_error_pass(model: nn.Module, observers: dict[str, Observer], how: str) -> bool:
    """Switch the observers that need it to their second pass; returns whether any did (then run the model
    over the calibration data once more, still inside :func:`observing`)."""
    qs = quantizers_of(model)
    started = False
    for name, obs in observers.items():
        if needs_error_pass(qs[name], how) and obs.batches:
            obs.start_error_pass(qs[name])
            started = True
    return started


def _fake_quant_uniform(x: torch.Tensor, q: UniformQuantizer, lo, hi) -> torch.Tensor:
    scale, zero = q.params_for_range(lo, hi)
    scale, zero = scale.to(x), zero.to(x)
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return (torch.clamp(torch.round(x / scale) + zero, q.qmin, q.qmax) - zero) * scale


def _uniform_error(x: torch.Tensor, q: UniformQuantizer, lo, hi, weights: torch.Tensor | None = None):
    """Sum of squared fake-quantization error of x (optionally weighted, e.g. histogram counts) for the
    parameters that cover [lo, hi]. With per-channel lo/hi of shape [C] and x of shape [C, n], per channel."""
    err = (_fake_quant_uniform(x, q, lo, hi) - x).pow(2)
    if weights is not None:
        err = err * weights
    return err.sum(-1)


def search_range(obs: Observer, q: UniformQuantizer) -> tuple[float, float]:
    """OMSE (per tensor): shrink the observed [min, max] by each factor of OMSE_FACTORS and keep the one with
    the lowest squared error over every observed value (the second pass's histogram)."""
    centres, counts = obs.histogram()
    errs = [float(_uniform_error(centres, q, torch.tensor(obs.min * f), torch.tensor(obs.max * f), counts))
            for f in OMSE_FACTORS]
    f = OMSE_FACTORS[min(range(len(errs)), key=errs.__getitem__)]
    return obs.min * f, obs.max * f


def apply_range(q: Quantizer, obs: Observer, how: str) -> None:
    """Set a quantizer's parameters from its observer with ``how`` in {minmax, percentile, omse, mse, quantiles}.
    A kind with its own search (``fit(observer)``, e.g. adalog) runs that instead.

    PTF quantizers (the LayerNorm inputs and residual stream of ``fq``): ``minmax`` takes the global min/max
    and gives each channel the finest shift whose grid still covers that channel; ``omse`` follows FQ-ViT:
    global min/max (never shrunk: the rare massive-activation tokens live at the ends of that range) and each
    channel's shift by the lowest squared error over every calibration value.
    """
    if hasattr(q, "fit"):
        q.fit(obs)
        return
    if not hasattr(q, "set_range"):  # parameter-free kinds (log2)
        q.mark_initialized()
        return
    if isinstance(q, UniformQuantizer) and q.channel_axis is not None:
        _apply_channel_range(q, obs, how)
        return
    if how == "minmax":
        lo, hi = obs.min, obs.max
    elif how == "percentile":
        if not obs.pct_hi:
            raise ValueError("percentile range needs an observer created with percentile=...")
        lo, hi = sum(obs.pct_lo) / len(obs.pct_lo), sum(obs.pct_hi) / len(obs.pct_hi)
    elif how == "omse" or (how in ("mse", "quantiles") and isinstance(q, PTFQuantizer)):  # PTF: FQ-ViT's rule
        if isinstance(q, PTFQuantizer):
            if obs.shift_errors is None:
                raise ValueError("the PTF shift search needs the observer's second pass (observe_errors)")
            q.set_range(obs.min, obs.max, channel_errors=obs.shift_errors)
            return
        lo, hi = search_range(obs, q)
    elif how in ("mse", "quantiles"):
        centres, counts = obs.histogram()
        search = _mse_channels if how == "mse" else _quantile_channels
        lo, hi = search(q, centres[None], torch.tensor([obs.min], dtype=torch.float64),
                        torch.tensor([obs.max], dtype=torch.float64), counts[None])
        lo, hi = float(lo[0]), float(hi[0])
    else:
        raise ValueError(f"unknown range estimator {how!r}")
    if isinstance(q, PTFQuantizer):
        q.set_range(lo, hi, channel_min=obs.channel_min, channel_max=obs.channel_max)
    else:
        q.set_range(lo, hi)


def _apply_channel_range(q: UniformQuantizer, obs: Observer, how: str) -> None:
    """Per-channel (e.g. per-head) activation ranges: min/max, mean per-batch percentiles, OMSE, mse or quantiles
    per channel."""
    if how == "minmax":
        lo, hi = obs.channel_min, obs.channel_max
    elif how == "percentile":
        if not obs.pct_hi:
            raise ValueError("percentile range needs an observer created with percentile=...")
        lo, hi = torch.stack(obs.pct_lo).mean(0), torch.stack(obs.pct_hi).mean(0)
    elif how == "omse":
        centres, counts = obs.histogram()
        lo, hi = _omse_channels(q, centres, obs.channel_min.double(), obs.channel_max.double(), counts)
    elif how in ("mse", "quantiles"):
        centres, counts = obs.histogram()
        search = _mse_channels if how == "mse" else _quantile_channels
        lo, hi = search(q, centres, obs.channel_min.double(), obs.channel_max.double(), counts)
    else:
        raise ValueError(f"unknown range estimator {how!r}")
    q.set_range(lo.float(), hi.float())


def _omse_channels(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   weights: torch.Tensor | None = None):
    """OMSE per channel: x is [C, n] (values, or histogram centres with ``weights`` = counts); each channel
    keeps its own best shrink factor."""
    errs = torch.stack([_uniform_error(x, q, lo * f, hi * f, weights) for f in OMSE_FACTORS])  # [F, C]
    f = torch.tensor(OMSE_FACTORS, device=x.device, dtype=lo.dtype)[errs.argmin(0)]
    return lo * f, hi * f


def _mse_channels(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  weights: torch.Tensor | None = None):
    """Least squared error per channel with the two ends of the range clipped independently: x is [C, n]
    (histogram centres with ``weights`` = counts, or values). A coordinate search (the upper end over
    ``hi·MSE_FACTORS`` with the lower end fixed, then the lower end over ``lo·MSE_FACTORS``, MSE_ROUNDS times)
    from two starts, the full observed range and OMSE's answer (both ends shrunk by one factor); each channel
    keeps the better end point. Each step's candidates include the current end, so the error is never above
    OMSE's (nor min/max's). The error surface has flat stretches (zero points round), so one start alone can
    stall: on DeiT-Tiny's post-GELU inputs the full-range start found up to 23 % lower error, on some q inputs
    the OMSE start does. Unlike OMSE, a long one-sided tail (post-GELU: [-0.17, 40]) can be clipped hard,
    below 0.11 of the max, without clipping the short side. Signed (symmetric) quantizers search one bound."""
    factors = torch.tensor(MSE_FACTORS, dtype=lo.dtype, device=lo.device)
    if q.signed:
        bound = torch.maximum(-lo, hi)
        errs = torch.stack([_uniform_error(x, q, -bound * f, bound * f, weights) for f in MSE_FACTORS])
        bound = bound * factors[errs.argmin(0)]
        return -bound, bound

    def descend(lo, hi):
        for _ in range(MSE_ROUNDS):
            errs = torch.stack([_uniform_error(x, q, lo, hi0 * f, weights) for f in MSE_FACTORS])
            hi = hi0 * factors[errs.argmin(0)]
            errs = torch.stack([_uniform_error(x, q, lo0 * f, hi, weights) for f in MSE_FACTORS])
            lo = lo0 * factors[errs.argmin(0)]
        return lo, hi, errs.min(0).values

    lo0, hi0 = lo.clone(), hi.clone()
    lo_a, hi_a, err_a = descend(lo0, hi0)
    lo_b, hi_b, err_b = descend(*_omse_channels(q, x, lo0, hi0, weights))
    better = err_b < err_a
    return torch.where(better, lo_b, lo_a), torch.where(better, hi_b, hi_a)


def _quantile_channels(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       weights: torch.Tensor | None = None):
    """RepQ-ViT's rule per channel: x is [C, n] (histogram centres with ``weights`` = counts, or values); the
    candidates are the ranges [quantile(1 - p), quantile(p)] for p in QUANTILES (of values: linearly
    interpolated, as torch.quantile; of a histogram: the centre of the bin where the cumulative count reaches
    the quantile), each widened to include 0, and each channel keeps the one with the least squared error.
    Signed (symmetric) quantizers take the larger magnitude of the two ends."""
    if weights is None:
        srt = x.sort(-1).values

        def quantile(p):
            pos = p * (x.shape[-1] - 1)
            i = int(pos)
            j = min(i + 1, x.shape[-1] - 1)
            return srt[:, i] + (srt[:, j] - srt[:, i]) * (pos - i)
    else:
        cum = weights.cumsum(-1)
        cum = cum / cum[:, -1:].clamp(min=1e-12)

        def quantile(p):
            i = torch.searchsorted(cum, torch.full_like(cum[:, :1], p)).clamp(max=x.shape[-1] - 1)
            return x.gather(-1, i)[:, 0]
    best = None
    for p in QUANTILES:
        c_hi = torch.maximum(torch.minimum(quantile(p), hi.to(x)), torch.zeros_like(hi.to(x)))
        c_lo = torch.minimum(torch.maximum(quantile(1.0 - p), lo.to(x)), torch.zeros_like(lo.to(x)))
        if q.signed:
            bound = torch.maximum(-c_lo, c_hi)
            c_lo, c_hi = -bound, bound
        err = _uniform_error(x, q, c_lo, c_hi, weights)
        if best is None:
            best = [c_lo, c_hi, err]
        else:
            better = err < best[2]
            best = [torch.where(better, c_lo, best[0]), torch.where(better, c_hi, best[1]),
                    torch.minimum(err, best[2])]
    return best[0], best[1]


@torch.no_grad()
def weight_range(q: UniformQuantizer, w: torch.Tensor, how: str) -> None:
    """Per-channel (or per-tensor) weight parameters from the weight itself: minmax, OMSE, mse or quantiles per
    channel."""
    if q.channel_axis is None:
        x = w.reshape(1, -1)
    else:
        x = w.transpose(0, q.channel_axis).reshape(w.shape[q.channel_axis], -1)
    x = x.float()
    lo, hi = x.min(1).values, x.max(1).values
    if how == "omse":
        lo, hi = _omse_channels(q, x, lo, hi)
    elif how == "mse":
        lo, hi = _mse_channels(q, x, lo, hi)
    elif how == "quantiles":
        lo, hi = _quantile_channels(q, x, lo, hi)
    elif how != "minmax":
        raise ValueError(f"unknown weight range estimator {how!r}")
    if q.channel_axis is None:
        lo, hi = lo[0], hi[0]
    q.set_range(lo, hi)
