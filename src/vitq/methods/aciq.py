"""ACIQ / "Post-training 4-bit quantization ... without fine-tuning" (Banner et al.; METHODS.md §2).

Three parts, each recorded in the returned dict (results.json):

- **Analytical clipping.** Every tensor is fitted with a Laplace (b̂ = mean |x − μ|) or a Gaussian (σ) and
  clipped to [μ − α, μ + α] ∩ [min, max] with α = k(bits)·b̂ (or k(bits)·σ). k is the table of METHODS.md §2
  for 2..8 bits: it minimizes the expected MSE = clipping noise + α²/(3·4^bits) (the rounding noise of 2^bits
  equal bins with a uniform density inside each bin). For other bit widths (allocated channels above 8) k is
  the numerical minimum of the same expression. Activations are fitted per tensor (per head for per-head
  quantizers) on every value the float model produces over all calibration images (exact moments, two
  passes); weights per output channel. Each quantizer then covers its clipped range with its own integer
  grid (uint: 2^b − 1 steps from lo to hi; int: symmetric), which is what the table assumes up to one step at
  low bit widths.
- **Per-channel bit allocation for weights** under a fixed average bit width B̄ (the scheme's weight bits):
  ideal bits b_c = B̄ + log2(range_c^(2/3)) − mean_c log2(range_c^(2/3)) (so they average to B̄ exactly),
  rounded to integers in [min_bits, max_bits] by largest remainder so the average stays exactly B̄. The
  2/3 exponent is Banner et al.'s (there the constraint is on the total number of bins; here, as specified,
  on the average bit width, i.e. the model size). The bits of every channel live in the ``uniform_mixed``
  quantizer (:mod:`vitq.quant.mixed`), so they are saved with the state.
- **Bias correction** of the weights (METHODS.md §1 (a)): per output channel the quantized weight gets the
  float weight's mean and standard deviation (the ``weight_correction`` buffer of every weighted layer).

Activation quantizers that are not uniform (log2 / twin / MPQ softmax kinds) have nothing to clip and are
left as their kind defines them; the PTF quantizers of the fq regime get their global range from the fit and
their per-channel shifts as usual. The softmax output is *not* clipped by default (``softmax="minmax"``): the
attention probabilities are far from a Laplace around their mean (most are near zero, the few large ones carry
the attention), and clipping them at μ + k·b̂ cut the top-1 agreement of an 8-bit digits ViT (``vitq demo``'s
model) from 99 % to 84 %; ``softmax="aciq"`` clips them like every other tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.methods.baselines import weighted_modules
from vitq.options import Options, opt
from vitq.quant.base import quantizers_of
from vitq.quant.mixed import MixedUniformQuantizer
from vitq.quant.observers import apply_range, observing
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer
from vitq.registry import register_method

# α / b̂ (Laplace) and α / σ (Gaussian) for 2..8 bits (METHODS.md §2)
LAPLACE_K = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
GAUSSIAN_K = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92}
DISTRIBUTIONS = ("laplace", "gaussian")


@dataclass(frozen=True)
class AciqOptions(Options):
    distribution: str = opt("laplace", "fitted distribution whose clipping constants are used",
                            choices=DISTRIBUTIONS)
    allocation: bool = opt(True, "per-channel weight bit allocation (off: every weight channel gets the scheme's "
                           "bits)")
    min_bits: int = opt(2, "fewest bits a weight channel may get", minimum=1, maximum=16)
    max_bits: int = opt(8, "most bits a weight channel may get", minimum=1, maximum=16)
    bias_corr: bool = opt(True, "weight bias correction (off: ablation)")
    softmax: str = opt("minmax", "range of the softmax-output quantizer: minmax or aciq (clipped like the others)",
                       choices=("aciq", "minmax"))
    activations: str = opt("aciq", "clip activations analytically (aciq) or keep their min/max (minmax: ACIQ on the "
                           "weights only)", choices=("aciq", "minmax"))


def expected_mse(k: float, bits: int, distribution: str) -> float:
    """Expected squared error per value (in units of b² or σ²) of clipping a zero-mean Laplace / Gaussian at
    ±k and rounding into 2^bits equal bins (uniform noise model Δ²/12 inside the range)."""
    if distribution == "laplace":
        clip = 2.0 * math.exp(-k)
    else:
        tail = 0.5 * math.erfc(k / math.sqrt(2.0))
        pdf = math.exp(-k * k / 2.0) / math.sqrt(2.0 * math.pi)
        clip = 2.0 * ((1.0 + k * k) * tail - k * pdf)
    return clip + k * k / (3.0 * 4.0**bits)


def clip_constant(bits: int, distribution: str = "laplace") -> float:
    """k(bits): the METHODS.md table for 2..8 bits, else the numerical minimum of :func:`expected_mse`."""
    table = LAPLACE_K if distribution == "laplace" else GAUSSIAN_K
    if bits in table:
        return table[bits]
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda k: expected_mse(k, bits, distribution), bounds=(0.5, 40.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(res.x)


def _clip(mu, spread, mn, mx, bits, distribution: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[μ − α, μ + α] ∩ [min, max] with α = k(bits)·spread, elementwise over channels (``bits`` an int or one
    per channel)."""
    n = mu.numel()
    bits_t = torch.as_tensor(bits).reshape(-1).expand(n).tolist()
    k = torch.tensor([clip_constant(int(b), distribution) for b in bits_t], dtype=mu.dtype, device=mu.device)
    alpha = k * spread
    return torch.maximum(mu - alpha, mn).float(), torch.minimum(mu + alpha, mx).float()


def fit_clip(x: torch.Tensor, bits: torch.Tensor | int, distribution: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped range (lo, hi) of the rows of ``x`` ([C, n]; one row per channel, or [1, n]) at ``bits`` (an int
    or one per row): [μ − α, μ + α] intersected with the observed [min, max]."""
    x = x.double()
    mu = x.mean(1)
    spread = (x - mu[:, None]).abs().mean(1) if distribution == "laplace" else x.std(1, unbiased=False)
    return _clip(mu, spread, x.min(1).values, x.max(1).values, bits, distribution)


class MomentObserver:
    """Exact statistics of every value a quantizer sees over the calibration data, in two passes: count, sum,
    sum of squares, min and max (per channel along ``channel_axis`` when given), then, once the mean is known,
    the sum of |x − μ|. ``pooled``: one fit over all channels (PTF), per-channel min/max still kept."""

    def __init__(self, channel_axis: int | None, pooled: bool = False):
        self.axis, self.pooled = channel_axis, pooled
        self.n = 0
        self.s1 = self.s2 = self.mn = self.mx = self.abs_dev = None
        self.second = False

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().double()
        if self.axis is None:
            return x.reshape(-1, 1)
        x = x.movedim(self.axis, -1)
        return x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        r = self._rows(x)
        if self.second:
            mu = self.mean().to(r.device)
            self.abs_dev = self.abs_dev + (r - mu).abs().sum(0).cpu()
            return
        first = self.s1 is None
        s1, s2, mn, mx = r.sum(0).cpu(), r.pow(2).sum(0).cpu(), r.min(0).values.cpu(), r.max(0).values.cpu()
        self.n += r.shape[0]
        self.s1 = s1 if first else self.s1 + s1
        self.s2 = s2 if first else self.s2 + s2
        self.mn = mn if first else torch.minimum(self.mn, mn)
        self.mx = mx if first else torch.maximum(self.mx, mx)

    def start_second_pass(self) -> None:
        self.second = True
        self.abs_dev = torch.zeros_like(self.s1)

    def count(self) -> int:
        return self.n * (self.s1.numel() if self.pooled else 1)

    def mean(self) -> torch.Tensor:
        return self.s1.sum(0, keepdim=True) / self.count() if self.pooled else self.s1 / self.n

    def fit(self, bits, distribution: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped (lo, hi): per channel, or one pair ([1]) when pooled or per tensor."""
        mu = self.mean()
        if distribution == "laplace":
            spread = (self.abs_dev.sum(0, keepdim=True) if self.pooled else self.abs_dev) / self.count()
        else:
            s2 = self.s2.sum(0, keepdim=True) if self.pooled else self.s2
            spread = (s2 / self.count() - mu * mu).clamp_min(0).sqrt()
        mn = self.mn.min().reshape(1) if self.pooled else self.mn
        mx = self.mx.max().reshape(1) if self.pooled else self.mx
        return _clip(mu, spread, mn, mx, bits, distribution)


def allocate_bits(ranges: torch.Tensor, avg_bits: int, min_bits: int, max_bits: int) -> torch.Tensor:
    """Integer bits per channel ∝ log2(range^(2/3)) around ``avg_bits``, within [min_bits, max_bits], whose
    mean is exactly ``avg_bits`` (largest-remainder rounding)."""
    if not min_bits <= avg_bits <= max_bits:
        raise VitqError(f"aciq: average weight bits {avg_bits} outside [--aciq-min-bits {min_bits}, "
                        f"--aciq-max-bits {max_bits}]")
    logr = (2.0 / 3.0) * torch.log2(ranges.double().clamp_min(1e-12))
    ideal = avg_bits + logr - logr.mean()
    bits = ideal.round().clamp(min_bits, max_bits)
    target = avg_bits * ranges.numel()
    while True:
        diff = int(bits.sum().item()) - target
        if diff == 0:
            break
        resid = ideal - bits  # > 0: the channel wants more bits than it has
        if diff > 0:
            key = torch.where(bits > min_bits, resid, torch.full_like(resid, math.inf))
            idx = key.argsort()[:min(diff, int((bits > min_bits).sum()))]
            bits[idx] -= 1
        else:
            key = torch.where(bits < max_bits, resid, torch.full_like(resid, -math.inf))
            idx = key.argsort(descending=True)[:min(-diff, int((bits < max_bits).sum()))]
            bits[idx] += 1
    return bits.long()


def _channel_rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


@torch.no_grad()
def calibrate_activations(model: nn.Module, calib: CalibData, distribution: str, softmax: str,
                          enabled: bool = True) -> dict:
    """Two float passes with a :class:`MomentObserver` on every activation quantizer that has a range to clip,
    then each quantizer's clipped range (min/max for the softmax output unless ``softmax="aciq"``, and for
    kinds without a uniform range)."""
    qs = quantizers_of(model)
    clip = {n: q for n, q in qs.items() if enabled and q.role != "weight" and (
        isinstance(q, PTFQuantizer) or (isinstance(q, UniformQuantizer) and not (
            q.role == "softmax" and softmax == "minmax")))}
    obs = {n: MomentObserver(-1 if isinstance(q, PTFQuantizer) else q.channel_axis, isinstance(q, PTFQuantizer))
           for n, q in clip.items()}
    with observing(model, names=[n for n, q in qs.items() if q.role != "weight" and n not in clip]) as others:
        for n, o in obs.items():
            qs[n].observer = o
        try:
            forward_all(model, calib, desc="aciq: observe")
            for o in obs.values():
                o.start_second_pass()
            for o in others.values():  # the min/max observers need nothing more
                o.update = lambda x: None
            forward_all(model, calib, desc="aciq: mean deviations")
        finally:
            for n in obs:
                qs[n].observer = None
    for n, o in others.items():
        apply_range(qs[n], o, "minmax")
    clipped = {}
    for name, o in obs.items():
        q = qs[name]
        lo, hi = o.fit(q.bits, distribution)
        if isinstance(q, PTFQuantizer):
            q.set_range(float(lo[0]), float(hi[0]), channel_min=o.mn.float(), channel_max=o.mx.float())
        elif q.channel_axis is None:
            q.set_range(lo[0], hi[0])
        else:
            q.set_range(lo, hi)
        full = float(o.mx.max() - o.mn.min())
        clipped[name] = round(float((hi - lo).max()) / full, 4) if full > 0 else 1.0
    return clipped


@torch.no_grad()
def calibrate_weights(model: nn.Module, distribution: str, allocation: bool, min_bits: int, max_bits: int,
                      bias_corr: bool) -> dict:
    layers = {}
    for name, m in weighted_modules(model).items():
        q = m.weight_quant
        rows = _channel_rows(m.weight)
        bits = torch.full((rows.shape[0],), q.bits, dtype=torch.long)
        if allocation and isinstance(q, UniformQuantizer) and q.channel_axis is not None:
            bits = allocate_bits(rows.max(1).values - rows.min(1).values, q.bits, min_bits, max_bits)
            if int(bits.min()) != int(bits.max()):
                q = MixedUniformQuantizer.from_uniform(q, bits)
                m.weight_quant = q
        lo, hi = fit_clip(rows, bits, distribution)
        if q.channel_axis is None:  # a per-tensor weight quantizer: one fit of the whole tensor
            lo, hi = fit_clip(rows.reshape(1, -1), q.bits, distribution)
            lo, hi = lo[0], hi[0]
        q.set_range(lo, hi)
        m.weight_correction.fill_(bias_corr)
        counts = torch.bincount(bits, minlength=max_bits + 1)
        layers[name] = {"channels": rows.shape[0], "mean_bits": float(bits.float().mean()),
                        "bits": {int(b): int(c) for b, c in enumerate(counts.tolist()) if c > 0}}
    return layers


@register_method("aciq", "ACIQ (Banner et al.): analytical Laplace/Gaussian clipping of every tensor, per-channel "
                 "weight bit allocation at a fixed average, weight bias correction", config=AciqOptions)
def aciq(model: nn.Module, calib: CalibData, cfg: AciqOptions) -> dict:
    o = cfg.to_dict()
    clipped = calibrate_activations(model, calib, cfg.distribution, cfg.softmax, cfg.activations == "aciq")
    layers = calibrate_weights(model, cfg.distribution, cfg.allocation, cfg.min_bits, cfg.max_bits, cfg.bias_corr)
    n = sum(v["channels"] for v in layers.values())
    weights = {name: m.weight.numel() for name, m in weighted_modules(model).items()}
    total = sum(weights.values())
    avg = sum(weights[k] * v["mean_bits"] for k, v in layers.items()) / max(total, 1)
    table = LAPLACE_K if o["distribution"] == "laplace" else GAUSSIAN_K
    return {"options": o, "constants": {str(b): table[b] for b in sorted(table)},
            "clipping": f"{o['distribution']} fit, alpha = k(bits) * "
                        + ("mean|x - mu|" if o["distribution"] == "laplace" else "std")
                        + ", range [mu - alpha, mu + alpha] within the observed [min, max]; activations per tensor "
                          "over every calibration value (two passes), weights per output channel",
            "activation_clip_ratio": clipped,
            "weight_channels": n, "average_weight_bits": avg,
            "allocation": ("bits_c = B + log2(range_c^(2/3)) - mean log2(range^(2/3)), largest-remainder "
                           f"rounding within [{o['min_bits']}, {o['max_bits']}], average exactly B per layer")
            if o["allocation"] else "off",
            "weight_bias_correction": o["bias_corr"], "layers": layers, "calibration_passes": 2}
