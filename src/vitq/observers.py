"""Range estimation from calibration data: min/max, percentile and OMSE, over *all* calibration batches.

An :class:`Observer` is attached to a quantizer inside :func:`observing`; it keeps the running min/max, a
seeded random sample of the values it saw (whole rows for PTF quantizers, so each channel keeps its values),
and, when asked, per-batch percentiles. The range functions then turn that record into quantizer parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitq.quantizers import PTFQuantizer, Quantizer, UniformQuantizer, quantizers_of

# OMSE shrink factors 1.00, 0.99, ..., 0.11 of the observed range (METHODS.md §1)
OMSE_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(90))


class Observer:
    """``channel_axis`` None: per-tensor statistics and a flat sample. Otherwise statistics per channel along
    that axis too, and the sample keeps whole rows (all channels of one position) so per-channel searches see
    each channel's own values."""

    def __init__(self, channel_axis: int | None = None, per_batch: int = 2**15, percentile: float | None = None,
                 seed: int = 0, channel_percentile: bool = False):
        self.channel_axis = channel_axis
        self.channel_percentile = channel_percentile and channel_axis is not None
        self.per_batch = per_batch
        self.percentile = percentile
        self.gen = torch.Generator().manual_seed(seed)
        self.min = float("inf")
        self.max = float("-inf")
        self.channel_min: torch.Tensor | None = None  # exact per-channel range (channel_axis only)
        self.channel_max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.pct_lo: list = []  # per batch: floats, or per-channel tensors
        self.pct_hi: list = []
        self.batches = 0

    @property
    def rows(self) -> bool:
        return self.channel_axis is not None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.batches += 1
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        if self.rows:
            flat = x.movedim(self.channel_axis, -1)
            flat = flat.reshape(-1, flat.shape[-1])
            cmin, cmax = flat.min(0).values.cpu(), flat.max(0).values.cpu()
            first = self.channel_min is None
            self.channel_min = cmin if first else torch.minimum(self.channel_min, cmin)
            self.channel_max = cmax if first else torch.maximum(self.channel_max, cmax)
        else:
            flat = x.reshape(-1)
        if self.percentile is not None:  # per channel, or over the whole tensor
            v = flat if self.channel_percentile else x.reshape(-1)
            n = v.shape[0]
            k_hi = min(n, max(1, int(round(self.percentile * n))))
            k_lo = max(1, n - k_hi + 1)
            hi, lo = v.kthvalue(k_hi, dim=0).values.cpu(), v.kthvalue(k_lo, dim=0).values.cpu()
            self.pct_hi.append(hi if self.channel_percentile else float(hi))
            self.pct_lo.append(lo if self.channel_percentile else float(lo))
        take = max(1, self.per_batch // flat.shape[-1]) if self.rows else self.per_batch
        if flat.shape[0] > take:
            idx = torch.randint(flat.shape[0], (take,), generator=self.gen).to(flat.device)
            flat = flat[idx]
        self.samples.append(flat.cpu())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def _observer_axis(q: Quantizer) -> int | None:
    if isinstance(q, PTFQuantizer):
        return -1
    return getattr(q, "channel_axis", None)


@contextmanager
def observing(model: nn.Module, names: Iterable[str] | None = None, percentile: float | None = None,
              seed: int = 0) -> Iterator[dict[str, Observer]]:
    """Attach a fresh observer to each chosen quantizer (default: every non-weight quantizer); while inside,
    those quantizers pass values through unchanged. Yields {name: observer}."""
    qs = quantizers_of(model)
    chosen = list(names) if names is not None else [n for n, q in qs.items() if q.role != "weight"]
    obs = {}
    for i, n in enumerate(chosen):
        axis = _observer_axis(qs[n])
        obs[n] = Observer(channel_axis=axis, percentile=percentile, seed=seed + i,
                          channel_percentile=isinstance(qs[n], UniformQuantizer) and axis is not None)
        qs[n].observer = obs[n]
    try:
        yield obs
    finally:
        for n in chosen:
            qs[n].observer = None


def _uniform_error(x: torch.Tensor, q: UniformQuantizer, lo, hi) -> torch.Tensor:
    """Sum of squared fake-quantization error of x for the parameters that cover [lo, hi]. With per-channel
    lo/hi of shape [C] and x of shape [C, n], the error is per channel."""
    scale, zero = q.params_for_range(lo, hi)
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    xq = (torch.clamp(torch.round(x / scale) + zero, q.qmin, q.qmax) - zero) * scale
    return (xq - x).pow(2).sum(-1)


def _ptf_error(obs: Observer, q: PTFQuantizer, lo: float, hi: float) -> float:
    """Error of a PTF quantizer set to [lo, hi] (with its per-channel shifts) on the observed sample rows."""
    q.set_range(lo, hi, channel_min=obs.channel_min, channel_max=obs.channel_max)
    rows = obs.sample().to(q.scale.device)  # samples are kept on the CPU, the quantizer may sit on a GPU
    return float((q.fake_quant(rows) - rows).pow(2).sum())


def search_range(obs: Observer, q: Quantizer) -> tuple[float, float]:
    """OMSE: shrink the observed [min, max] by each factor of OMSE_FACTORS, keep the one with the lowest
    squared error on the observed sample."""
    best, best_f = None, 1.0
    lo, hi = obs.min, obs.max
    x = obs.sample()
    for f in OMSE_FACTORS:
        if isinstance(q, PTFQuantizer):
            err = _ptf_error(obs, q, lo * f, hi * f)
        else:
            err = float(_uniform_error(x.reshape(-1), q, torch.tensor(lo * f), torch.tensor(hi * f)))
        if best is None or err < best:
            best, best_f = err, f
    return lo * best_f, hi * best_f


def apply_range(q: Quantizer, obs: Observer, how: str) -> None:
    """Set a quantizer's parameters from its observer with ``how`` in {minmax, percentile, omse}. A kind
    with its own search (``fit(observer)``, e.g. adalog) runs that instead."""
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
    elif how == "omse":
        lo, hi = search_range(obs, q)
    else:
        raise ValueError(f"unknown range estimator {how!r}")
    if isinstance(q, PTFQuantizer):
        q.set_range(lo, hi, channel_min=obs.channel_min, channel_max=obs.channel_max)
    else:
        q.set_range(lo, hi)


def _apply_channel_range(q: UniformQuantizer, obs: Observer, how: str) -> None:
    """Per-channel (e.g. per-head) activation ranges: min/max, mean per-batch percentiles, or OMSE per channel."""
    if how == "minmax":
        lo, hi = obs.channel_min, obs.channel_max
    elif how == "percentile":
        if not obs.pct_hi:
            raise ValueError("percentile range needs an observer created with percentile=...")
        lo, hi = torch.stack(obs.pct_lo).mean(0), torch.stack(obs.pct_hi).mean(0)
    elif how == "omse":
        lo, hi = _omse_channels(q, obs.sample().t(), obs.channel_min, obs.channel_max)
    else:
        raise ValueError(f"unknown range estimator {how!r}")
    q.set_range(lo, hi)


def _omse_channels(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """OMSE per channel: x is [C, n]; each channel keeps its own best shrink factor."""
    errs = torch.stack([_uniform_error(x, q, lo * f, hi * f) for f in OMSE_FACTORS])  # [F, C]
    f = torch.tensor(OMSE_FACTORS, device=x.device)[errs.argmin(0)]
    return lo * f, hi * f


@torch.no_grad()
def weight_range(q: UniformQuantizer, w: torch.Tensor, how: str) -> None:
    """Per-channel (or per-tensor) weight parameters from the weight itself: minmax or OMSE per channel."""
    if q.channel_axis is None:
        x = w.reshape(1, -1)
    else:
        x = w.transpose(0, q.channel_axis).reshape(w.shape[q.channel_axis], -1)
    x = x.float()
    lo, hi = x.min(1).values, x.max(1).values
    if how == "omse":
        lo, hi = _omse_channels(q, x, lo, hi)
    elif how != "minmax":
        raise ValueError(f"unknown weight range estimator {how!r}")
    if q.channel_axis is None:
        lo, hi = lo[0], hi[0]
    q.set_range(lo, hi)
