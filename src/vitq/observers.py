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
    def __init__(self, rows: bool = False, per_batch: int = 2**15, percentile: float | None = None,
                 seed: int = 0):
        self.rows = rows
        self.per_batch = per_batch
        self.percentile = percentile
        self.gen = torch.Generator().manual_seed(seed)
        self.min = float("inf")
        self.max = float("-inf")
        self.channel_min: torch.Tensor | None = None  # rows only: exact per-channel range
        self.channel_max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.pct_lo: list[float] = []
        self.pct_hi: list[float] = []
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.batches += 1
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        flat = x.reshape(-1, x.shape[-1]) if self.rows else x.reshape(-1)
        if self.rows:
            cmin, cmax = flat.min(0).values.cpu(), flat.max(0).values.cpu()
            first = self.channel_min is None
            self.channel_min = cmin if first else torch.minimum(self.channel_min, cmin)
            self.channel_max = cmax if first else torch.maximum(self.channel_max, cmax)
        take = max(1, self.per_batch // flat.shape[-1]) if self.rows else self.per_batch
        if flat.shape[0] > take:
            idx = torch.randint(flat.shape[0], (take,), generator=self.gen).to(flat.device)
            flat = flat[idx]
        self.samples.append(flat.cpu())
        if self.percentile is not None:
            v = x.reshape(-1)
            n = v.numel()
            k_hi = min(n, max(1, int(round(self.percentile * n))))
            k_lo = max(1, n - k_hi + 1)
            self.pct_hi.append(float(v.kthvalue(k_hi).values))
            self.pct_lo.append(float(v.kthvalue(k_lo).values))

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


@contextmanager
def observing(model: nn.Module, names: Iterable[str] | None = None, percentile: float | None = None,
              seed: int = 0) -> Iterator[dict[str, Observer]]:
    """Attach a fresh observer to each chosen quantizer (default: every non-weight quantizer); while inside,
    those quantizers pass values through unchanged. Yields {name: observer}."""
    qs = quantizers_of(model)
    chosen = list(names) if names is not None else [n for n, q in qs.items() if q.role != "weight"]
    obs = {}
    for i, n in enumerate(chosen):
        obs[n] = Observer(rows=isinstance(qs[n], PTFQuantizer), percentile=percentile, seed=seed + i)
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
    rows = obs.sample()
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
    """Set a quantizer's parameters from its observer with ``how`` in {minmax, percentile, omse}."""
    if not hasattr(q, "set_range"):  # parameter-free kinds (log2)
        q.mark_initialized()
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
        errs = torch.stack([_uniform_error(x, q, lo * f, hi * f) for f in OMSE_FACTORS])  # [F, C]
        f = torch.tensor(OMSE_FACTORS, device=x.device)[errs.argmin(0)]
        lo, hi = lo * f, hi * f
    elif how != "minmax":
        raise ValueError(f"unknown weight range estimator {how!r}")
    if q.channel_axis is None:
        lo, hi = lo[0], hi[0]
    q.set_range(lo, hi)
