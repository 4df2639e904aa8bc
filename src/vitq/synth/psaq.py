"""PSAQ-ViT (patch similarity aware data-free quantization, Li et al. 2022, v1) for vision transformers.

A transformer has no BatchNorm statistics to match, but its self-attention says something about real images:
on a real image the patches of one picture are alike in many different degrees (sky with sky, edge with edge),
so the cosine similarities between the patch features a self-attention layer outputs spread over a wide range;
on noise they crowd near one value. The generator makes that spread large, as the paper defines it:

- the features: each self-attention layer's output before its output projection (attention·V, the input of
  ``proj`` / ``o_proj`` / ``out_proj``), averaged over the heads ([B, N, H·d] -> [B, N, d]), without the
  prefix tokens (class, distillation, register) where the model says how many it has; Swin's windows (and
  other window or patch-group layouts whose batch is a multiple of the images') are pooled per image;
- the similarities: the cosine similarity of every pair of tokens (all N x N, a token with itself included as
  in the reference code), per image;
- the entropy: a Gaussian kernel density estimate with a fixed bandwidth (0.01) over all of an image's
  similarities, evaluated on ``grid`` points spread from the batch's smallest to its largest similarity, and
  the differential entropy -∫ p log p by the trapezoid rule; summed over the layers and maximised,

together with a cross-entropy toward a target class per image (v1's class prior) and DeepInversion's image prior
(the L2 total variation pulled toward a random target) and loop (two rounds, each with a warm-up and a cosine
decay, a random shift of up to 15 then 30 pixels and a random flip each step, Adam betas 0.5 / 0.9). The older
measurement point of vitq (the input of the ``qkv`` projection) stays available as ``point=attention-input``.
v2's teacher-student loop trains the quantized model on the images it makes (fine-tuning, not calibration), so
it is not part of this calibration-only generator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.options import OptionError, opt
from vitq.synth.base import (
    Generated,
    InputHooks,
    LoopOptions,
    Request,
    model_name,
    optimise,
    register_generator,
    target_classes,
)

ATTENTION_INPUTS = ("qkv", "query", "q_proj")  # the projection whose input is a self-attention layer's input
ATTENTION_OUTPUTS = ("proj", "o_proj", "out_proj")  # the projection whose input is its attention·V output
POINTS = ("attention-output", "attention-input")
TOKEN_PARAMS = re.compile(r"(^|\.)(cls_token|dist_token|distillation_token|reg_token|register_tokens)$")
# the reference's image-prior target at its batch of 32 images of 3 x 224 x 224 (2500 to 3000 for the sum of
# four L2 norms of neighbour differences), per element of those differences
PRIOR_RMS = (0.2857, 0.3429)  # 2500 and 3000 / (2·√(32·3·224·223) + 2·√(32·3·223·223))


@dataclass(frozen=True)
class PsaqOptions(LoopOptions):
    VERSION: ClassVar[int] = 2  # 2: the paper's attention-output features, all-pairs KDE entropy, DeepInversion loop

    entropy_weight: float = opt(1.0, "weight of the patch-similarity entropy, summed over layers (maximised)",
                                minimum=0)
    point: str = opt("attention-output", "where the patch features are read: the attention·V output (the "
                     "paper) or the input of the qkv projection (vitq before)", choices=POINTS)
    bandwidth: float = opt(0.01, "bandwidth of the Gaussian kernel density estimate", above=0)
    grid: int = opt(10, "points between the smallest and largest similarity where the density is evaluated "
                        "(trapezoid rule)", minimum=2)
    tv_weight: float = opt(0.0, "weight of the L1 total-variation prior of the other generators (psaq uses "
                                "prior_weight)", minimum=0)
    prior_weight: float = opt(0.05, "weight of |L2 total variation - target| (DeepInversion's image prior)",
                              minimum=0)
    prior_rms: tuple[float, ...] = opt(PRIOR_RMS, "range the prior's target is drawn from per batch, as the root "
                                       "mean square of a neighbour difference", minimum=0)
    rounds: int = opt(2, "rounds the steps are split into, each restarting the learning-rate schedule (and "
                         "widening the jitter)", minimum=1)
    warmup: float = opt(0.2, "share of each round's steps with a linear learning-rate warm-up", minimum=0, below=1)
    jitter: int = opt(15, "random shift (pixels, both axes) before each step, up to this many in the first round, "
                          "twice as many in the second, ...", minimum=0)
    flip: bool = opt(True, "random horizontal flip of the images before each step")
    beta1: float = opt(0.5, "Adam beta1", minimum=0, below=1)
    beta2: float = opt(0.9, "Adam beta2", minimum=0, below=1)

    def check(self) -> None:
        if len(self.prior_rms) != 2 or self.prior_rms[0] > self.prior_rms[1]:
            raise OptionError("prior_rms", self.prior_rms, "two numbers LOW,HIGH with LOW <= HIGH")


def attention_inputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose input is a self-attention input: each attention's qkv (or query, q_proj) projection."""
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ATTENTION_INPUTS]


def psaq_unfit(model: nn.Module) -> str | None:
    if attention_inputs(model):
        return None
    return (f"--synthetic-generator psaq reads the self-attention layers, and {model_name(model)} has none (no "
            "qkv/query/q_proj projection); for CNNs with BatchNorm use bn (data-free) or fdda (with real images)")


@dataclass
class Probe:
    """Where one layer's patch features are read: ``module``'s input, split into ``heads`` heads (1: used as it
    is), and the prefix tokens a layer of ``tokens_with_prefix`` tokens starts with."""

    name: str
    module: nn.Module
    heads: int
    prefix: int
    tokens_with_prefix: tuple[int, ...]


def prefix_tokens(model: nn.Module) -> tuple[int, tuple[int, ...]]:
    """(how many prefix tokens the model puts before its patches, the token counts a layer that carries them
    has: its patch counts plus them); (0, ()) where the model does not say."""
    n = getattr(model, "num_prefix_tokens", None)
    if not isinstance(n, int):
        n = sum(p.shape[-2] for name, p in model.named_parameters() if TOKEN_PARAMS.search(name) and p.dim() >= 2)
    patches = {m.num_patches for m in model.modules() if isinstance(getattr(m, "num_patches", None), int)}
    return (n, tuple(sorted(p + n for p in patches))) if n else (0, ())


def probes(model: nn.Module, point: str = "attention-output") -> list[Probe]:
    """One :class:`Probe` per self-attention layer: at its output projection's input (``attention-output``;
    a layer without a known output projection is read at its input instead) or at its qkv projection's input."""
    mods = dict(model.named_modules())
    prefix, with_prefix = prefix_tokens(model)
    out = []
    for name, qkv in attention_inputs(model):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        attn = mods[parent]
        proj = next((getattr(attn, p) for p in ATTENTION_OUTPUTS if isinstance(getattr(attn, p, None), nn.Module)),
                    None)
        heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None) \
            or getattr(getattr(attn, "config", None), "num_attention_heads", None)
        if point == "attention-output" and proj is not None:
            out.append(Probe(f"{parent}:attention-output", proj, int(heads or 1), prefix, with_prefix))
        else:
            out.append(Probe(name, qkv, 1, prefix, with_prefix))
    return out


def patch_features(a: torch.Tensor, probe: Probe) -> torch.Tensor | None:
    """A layer's recorded input -> patch features [B', N, d]: 4-D [B', C, H, W] maps flattened to tokens, the
    head average taken, the prefix tokens dropped (None for an input that is not a token map)."""
    if a is None:
        return None
    if a.dim() == 4:
        a = a.flatten(2).transpose(1, 2)
    if a.dim() != 3:
        return None
    b, n, c = a.shape
    if probe.heads > 1 and c % probe.heads == 0:
        a = a.reshape(b, n, probe.heads, c // probe.heads).mean(2)
    if probe.prefix and n in probe.tokens_with_prefix:
        a = a[:, probe.prefix:]
    return a if a.shape[1] >= 2 else None


def pair_similarities(feats: torch.Tensor, images: int) -> list[tuple[torch.Tensor, float]]:
    """The cosine similarities of all N x N pairs of tokens of each row of ``feats`` [B', N, d], pooled per image
    (B' a multiple of the images, e.g. Swin's windows; else per row), as (samples, weight) parts: the similarity
    matrix is symmetric, so each pair i < j stands for two samples and the diagonal (a token with itself) for
    one, which gives the all-pairs estimate at half the cost."""
    t = nn.functional.normalize(feats.to(torch.promote_types(feats.dtype, torch.float32)), dim=-1)
    sims = torch.bmm(t, t.transpose(1, 2))
    rows = images if sims.shape[0] % images == 0 else sims.shape[0]
    i, j = torch.triu_indices(sims.shape[1], sims.shape[1], 1, device=sims.device)
    return [(sims[:, i, j].reshape(rows, -1), 2.0), (sims.diagonal(dim1=1, dim2=2).reshape(rows, -1), 1.0)]


class GaussianKde(torch.autograd.Function):
    """Sum over the samples ``s`` [R, M] of exp(-((x_k - s)/h)^2 / 2) at the evenly spaced points ``grid`` [K]
    (-> [R, K]). Each sample is taken only to the grid points within ``CUTOFF`` bandwidths of it, found from its
    nearest one, where that band is narrower than the grid (what is left out is below 1e-10 of a sample's peak,
    under float32's rounding of the sum); in chunks, the kernel values recomputed in the backward pass instead
    of kept (all pairs of DeiT's 196 patches are 38 416 samples per image, in each of twelve layers)."""

    CHUNK = 1 << 22  # kernel values at once
    CUTOFF = 7.0

    @staticmethod
    def _terms(s, grid, h, band):
        """(grid index [R, c] or None for all of them, kernel values, (x - s)/h, in-range mask or None) per pass."""
        if band is None:
            z = grid.view(1, -1, 1) / h - (s / h).unsqueeze(1)  # [R, K, c]
            yield None, z.square().mul_(-0.5).exp_(), z, None
            return
        k_max = grid.numel() - 1
        near = ((s - grid[0]) / (grid[1] - grid[0])).round().long().clamp_(0, k_max)
        for o in range(-band, band + 1):
            k = near + o
            ok = None if band == 0 else (k >= 0) & (k <= k_max)
            k = k if band == 0 else k.clamp(0, k_max)
            z = (grid[k] - s).div_(h)
            e = z.square().mul_(-0.5).exp_()
            yield k, e if ok is None else e * ok, z, ok

    @staticmethod
    def forward(ctx, s, grid, h):
        r, n = s.shape
        spacing = float(grid[1] - grid[0])
        band = max(0, math.ceil(GaussianKde.CUTOFF * h / spacing - 0.5))
        band = band if 2 * band + 1 < grid.numel() else None
        step = max(1, GaussianKde.CHUNK // (r * (grid.numel() if band is None else 2 * band + 1)))
        out = s.new_zeros(r, grid.numel())
        for chunk in s.split(step, dim=1):
            for k, e, _, _ in GaussianKde._terms(chunk, grid, h, band):
                if k is None:
                    out += e.sum(2)
                else:
                    out.scatter_add_(1, k, e)
        ctx.save_for_backward(s, grid)
        ctx.h, ctx.band, ctx.step = h, band, step
        return out

    @staticmethod
    def backward(ctx, g):
        s, grid = ctx.saved_tensors
        parts = []
        for chunk in s.split(ctx.step, dim=1):
            d = torch.zeros_like(chunk)
            for k, e, z, _ in GaussianKde._terms(chunk, grid, ctx.h, ctx.band):
                w = g.unsqueeze(2) if k is None else g.gather(1, k)  # d exp(-z^2/2)/ds = exp(-z^2/2) z / h
                d += e.mul_(z).mul_(w).sum(1) if k is None else e.mul_(z).mul_(w)
            parts.append(d / ctx.h)
        return torch.cat(parts, 1), None, None


def differential_entropy(parts: torch.Tensor | list[tuple[torch.Tensor, float]], bandwidth: float = 0.01,
                         grid: int = 10) -> torch.Tensor:
    """Mean over rows of -∫ p log p of each row's Gaussian kernel density (fixed bandwidth; ``parts``: samples
    [R, M], or (samples, weight) pairs pooled), by the trapezoid rule on ``grid`` points from the smallest to the
    largest sample of all rows (the points carry no gradient); p gets 1e-4 added against log 0."""
    parts = [(parts, 1.0)] if isinstance(parts, torch.Tensor) else parts
    lo = min(float(p.detach().min()) for p, _ in parts)
    hi = max(max(float(p.detach().max()) for p, _ in parts), lo + 1e-6)
    xs = torch.linspace(lo, hi, grid, device=parts[0][0].device, dtype=parts[0][0].dtype)
    total = sum(p.shape[1] * w for p, w in parts)
    dens = sum(w * GaussianKde.apply(p, xs, bandwidth) for p, w in parts) / (total * bandwidth * math.sqrt(2 * math.pi))
    p = dens + 1e-4
    return torch.trapezoid(-p * p.log(), xs, dim=-1).mean()


def tv_l2(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The sum of the L2 norms of the vertical, horizontal and both diagonal neighbour differences of a batch, and
    the sum of the square roots of their element counts (the norm a unit RMS difference would give)."""
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs), sum(math.sqrt(d.numel()) for d in diffs)


@register_generator("psaq", PsaqOptions, "vision transformers: maximise the entropy of the patch similarities at "
                    "every self-attention output (PSAQ-ViT v1)", psaq_unfit)
def generate_psaq(model: nn.Module, req: Request, cfg: PsaqOptions) -> Generated:
    layers = probes(model, cfg.point)
    labels = target_classes(req, torch.Generator().manual_seed(req.seed))
    targets = {}  # batch start -> the prior's RMS target, drawn once per batch
    with InputHooks([p.module for p in layers]) as hooks:
        def loss_fn(x, logits, y, gen, start):
            feats = [patch_features(a, p) for a, p in zip(hooks.inputs, layers, strict=True)]
            feats = [f for f in feats if f is not None]
            if not feats:
                raise VitqError(f"psaq: no self-attention layer of {model_name(model)} gave patch features at "
                                f"{cfg.point} (try --synthetic-option point=attention-output)")
            entropy = sum(differential_entropy(pair_similarities(f, len(x)), cfg.bandwidth, cfg.grid)
                          for f in feats)
            loss, parts = -cfg.entropy_weight * entropy, {"entropy": float(entropy.detach())}
            if cfg.prior_weight:
                if start not in targets:
                    lo, hi = cfg.prior_rms
                    targets[start] = lo + (hi - lo) * float(torch.rand((), generator=gen))
                tv, unit = tv_l2(x)
                prior = (tv - targets[start] * unit).abs()
                loss, parts = loss + cfg.prior_weight * prior, {**parts, "prior": float(prior.detach())}
            return loss, parts
        out = optimise(model, req, cfg, loss_fn, labels, "synthesize (psaq)")
    out.info.update({"attention_layers": len(layers), "point": cfg.point,
                     "heads_averaged": sorted({p.heads for p in layers}),
                     "prefix_tokens": layers[0].prefix if layers else 0})
    return out
