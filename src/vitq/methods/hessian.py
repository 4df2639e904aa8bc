"""Shared engine of PTQ4ViT and APQ-ViT: one float pass that records what the searches need (layer inputs
and outputs, attention q/k/v/probabilities, block inputs/outputs) together with the gradients of the task
loss, then grid searches over quantizer parameters ("knobs") that minimise a squared-gradient-weighted
distance (the diagonal-Hessian approximation of PTQ4ViT: E[(O-Ô)ᵀ diag((∂L/∂O)²) (O-Ô)]).

The task loss on unlabelled calibration images is the cross-entropy of the float model's logits against its
own top-1 prediction (summed over images). KL to the model's own output would be the natural alternative,
but its gradient is exactly zero at the float model, which is where PTQ4ViT takes the gradients.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitq.models.timm_vit import QAttention, QBlock, QWindowAttention
from vitq.quant.base import Quantizer, quantizers_of
from vitq.quant.modules import QConv2d, QLinear, QWeighted
from vitq.quant.twin import MPQQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer
from vitq.quant.uniform import UniformQuantizer

# -- metrics ---------------------------------------------------------------------------------------------------


def weighted_sq_error(o: torch.Tensor, o_hat: torch.Tensor, g2: torch.Tensor,
                      channel_dim: int | None = None) -> torch.Tensor:
    """Σ g²·(o - ô)²: a scalar, or one value per index of ``channel_dim`` (summed over the other dims)."""
    e = (o - o_hat).pow(2) * g2
    if channel_dim is None:
        return e.sum()
    return e.transpose(0, channel_dim).reshape(e.shape[channel_dim], -1).sum(1)


def hessian_distance(o: torch.Tensor, o_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """PTQ4ViT's Hessian-guided distance E_n[(O_n - Ô_n)ᵀ diag((∂L/∂O_n)²) (O_n - Ô_n)] over samples n (dim 0)."""
    return weighted_sq_error(o, o_hat, grad.pow(2)) / o.shape[0]


def keep_count(n: int, keep_fraction: float) -> int:
    """How many of n elements bottom elimination keeps: ceil(keep_fraction·n), at least 1."""
    return max(1, min(n, math.ceil(keep_fraction * n - 1e-9)))


def bottom_elimination_mask(err: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask (shape of ``err``) of the elements bottom elimination keeps: the largest
    ``keep_count(n, keep_fraction)``; the ``n - keep`` smallest are dropped."""
    flat = err.reshape(-1)
    idx = flat.topk(keep_count(flat.numel(), keep_fraction)).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return mask.view_as(err)


def bbc_distance(o: torch.Tensor, o_hat: torch.Tensor, g2: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """APQ-ViT's block metric (our interpretation): per-element g²·(o - ô)², the smallest dropped, the kept
    (largest) summed."""
    e = ((o - o_hat).pow(2) * g2).reshape(-1)
    if keep_fraction >= 1.0:
        return e.sum()
    return e.topk(keep_count(e.numel(), keep_fraction), sorted=False).values.sum()


def task_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own top-1 prediction (pseudo-label), summed over images."""
    return F.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum")


# -- float pass with gradients ---------------------------------------------------------------------------------


class _PassThrough:
    """An 'observer' that records nothing: while attached, a quantizer is the identity."""

    def update(self, x: torch.Tensor) -> None:
        pass


@contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Every quantizer of the model passes values through unchanged (the float model) inside the block."""
    qs = quantizers_of(model)
    saved = {n: q.observer for n, q in qs.items()}
    tap = _PassThrough()
    for q in qs.values():
        q.observer = tap
    try:
        yield
    finally:
        for n, q in qs.items():
            q.observer = saved[n]


@dataclass
class Capture:
    """What the float pass recorded, on the CPU, concatenated over images. ``g2`` are squared gradients."""

    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # x, o, g2 (rows or images)
    attn: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # q, k, v, a, g2_s, g2_o
    blocks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # x, o, g2 (full)
    num_images: int = 0


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QAttention, QWindowAttention))}


def _sample(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor | None:
    if fraction >= 1.0:
        return None
    k = max(1, math.ceil(fraction * n))
    return torch.randperm(n, generator=gen)[:k].sort().values


def capture(model: nn.Module, images: torch.Tensor, device, batch_size: int = 8, token_fraction: float = 1.0,
            blocks: list[str] | None = None, seed: int = 0, bar: Callable = lambda it, **kw: it) -> Capture:
    """Run the float model (quantizers bypassed) over ``images`` in batches, differentiate the task loss and
    record, per weighted layer, its input/output/squared output gradient (token rows subsampled to
    ``token_fraction`` for 3-D inputs), per attention its q/k/v, softmax output and squared gradients of the
    scores and of the attention·V output (query rows subsampled), and for the named ``blocks`` their
    full input, output and squared output gradient."""
    gen = torch.Generator().manual_seed(seed)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QWeighted)}
    attns = attention_modules(model)
    block_mods = {n: model.get_submodule(n) for n in (blocks or [])}
    acc: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    cap = Capture()
    for start in bar(range(0, images.shape[0], batch_size), desc="float pass with gradients",
                     total=-(-images.shape[0] // batch_size)):
        rec: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        targets: list[tuple[str, str, torch.Tensor]] = []
        hooks = _register_hooks(layers, attns, block_mods, rec, targets)
        try:
            x = images[start:start + batch_size].to(device).clone().requires_grad_(True)
            with torch.enable_grad(), float_mode(model):
                loss = task_loss(model(x))
                grads = torch.autograd.grad(loss, [t for _, _, t in targets], allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        for (name, key, t), g in zip(targets, grads):
            rec[name][key] = torch.zeros_like(t) if g is None else g.detach()
        _store_batch(rec, layers, attns, block_mods, acc, token_fraction, gen)
        cap.num_images += x.shape[0]
    for name, d in acc.items():
        table = cap.layers if name in layers else cap.attn if name in attns else cap.blocks
        table[name] = {k: torch.cat(v) for k, v in d.items()}
    return cap


def _register_hooks(layers, attns, block_mods, rec, targets) -> list:
    """Forward hooks that record values into ``rec[name][key]`` and tensors to differentiate into ``targets``."""

    def io_hook(name):
        def hook(mod, inp, out):
            rec[name]["x"], rec[name]["o"] = inp[0].detach(), out.detach()
            targets.append((name, "g", out))
        return hook

    def value_hook(name, key, grad=False, output=False):
        def hook(mod, inp, out):
            t = out if output else inp[0]
            rec[name][key] = t.detach()
            if grad:
                targets.append((name, "g_" + key, t))
        return hook

    def proj_pre_hook(name):
        def hook(mod, inp):
            targets.append((name, "g_o", inp[0]))
        return hook

    hooks = []
    for n, m in {**layers, **block_mods}.items():
        hooks.append(m.register_forward_hook(io_hook(n)))
    for n, a in attns.items():
        hooks.append(a.q_quant.register_forward_hook(value_hook(n, "q")))
        hooks.append(a.k_quant.register_forward_hook(value_hook(n, "k")))
        hooks.append(a.v_quant.register_forward_hook(value_hook(n, "v")))
        hooks.append(a.score_quant.register_forward_hook(value_hook(n, "s", grad=True, output=True)))
        hooks.append(a.softmax_quant.register_forward_hook(value_hook(n, "a")))
        hooks.append(a.proj.register_forward_pre_hook(proj_pre_hook(n)))
    return hooks


def _store_batch(rec, layers, attns, block_mods, acc, token_fraction, gen) -> None:
    for n, m in layers.items():
        r = rec.get(n, {})
        if "g" not in r:  # not used by this model's forward
            continue
        x, o, g = r["x"], r["o"], r["g"]
        if isinstance(m, QLinear) and x.dim() > 2:
            x, o, g = x.reshape(-1, x.shape[-1]), o.reshape(-1, o.shape[-1]), g.reshape(-1, g.shape[-1])
            idx = _sample(x.shape[0], token_fraction, gen)
            if idx is not None:
                idx = idx.to(x.device)
                x, o, g = x[idx], o[idx], g[idx]
        acc[n]["x"].append(x.cpu())
        acc[n]["o"].append(o.cpu())
        acc[n]["g2"].append(g.pow(2).cpu())
    for n in attns:
        r = rec.get(n, {})
        if "g_o" not in r:
            continue
        q = r["q"]
        B, H, N, d = q.shape
        g_o = r["g_o"].reshape(B, N, H, d).permute(0, 2, 1, 3)  # grad of (attn @ v) before the head merge
        idx = _sample(N, token_fraction, gen)
        idx = None if idx is None else idx.to(q.device)

        def rows(t, idx=idx):
            return t if idx is None else t[:, :, idx]
        acc[n]["q"].append(rows(q).cpu())
        acc[n]["k"].append(r["k"].cpu())
        acc[n]["v"].append(r["v"].cpu())
        acc[n]["a"].append(rows(r["a"]).cpu())
        acc[n]["g2_s"].append(rows(r["g_s"]).pow(2).cpu())
        acc[n]["g2_o"].append(rows(g_o).pow(2).cpu())
    for n in block_mods:
        r = rec.get(n, {})
        if "g" not in r:
            continue
        acc[n]["x"].append(r["x"].cpu())
        acc[n]["o"].append(r["o"].cpu())
        acc[n]["g2"].append(r["g"].pow(2).cpu())


# -- knobs: one quantizer's candidate parameter sets -----------------------------------------------------------


class Knob:
    """The candidate parameter states of one quantizer (dicts buffer name -> tensor) and the chosen one."""

    def __init__(self, name: str, q: Quantizer, states: list[dict[str, torch.Tensor]], labels: list,
                 per_channel: bool = False):
        self.name, self.q, self.states, self.labels, self.per_channel = name, q, states, labels, per_channel
        self.choice = None  # index, or a per-channel index tensor

    def apply_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            getattr(self.q, k).copy_(v)

    def apply(self, i: int) -> None:
        self.apply_state(self.states[i])

    def apply_per_channel(self, idx: torch.Tensor) -> None:
        """Channel c takes the parameters of state idx[c]."""
        ar = torch.arange(idx.numel(), device=idx.device)
        self.apply_state({k: torch.stack([s[k] for s in self.states])[idx, ar] for k in self.states[0]})

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self.q, k).clone() for k in self.states[0]}

    def describe(self):
        if self.choice is None:
            return None
        if isinstance(self.choice, torch.Tensor):
            vals = torch.tensor([float(self.labels[i]) for i in self.choice.tolist()])
            return {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())}
        return self.labels[self.choice]


def linear_grid(alpha: float, beta: float, n: int) -> list[float]:
    """n factors spread linearly over [alpha, beta]; alpha = 0 starts at beta/n (a zero scale is degenerate)."""
    if n < 1:
        raise ValueError("need at least one candidate")
    if alpha <= 0:
        return [beta * (i + 1) / n for i in range(n)]
    if n == 1:
        return [beta]
    return [alpha + (beta - alpha) * i / (n - 1) for i in range(n)]


def _uniform_range(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    if q.signed:
        hi = q.qmax * q.scale
        return -hi, hi
    return (q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale


@dataclass
class Grids:
    factors: list[float]  # scale factors for uniform quantizers (relative to the current range)
    twin_shifts: list[int]  # twin softmax: small range tops 2^-k
    mpq_thresholds: list[float]  # MPQ thresholds t


def make_knob(name: str, q, grids: Grids, per_channel: bool = False) -> Knob | None:
    """Candidates for quantizer ``q`` (None for kinds with nothing to search, e.g. log2)."""
    if not isinstance(q, Quantizer):
        return None
    if isinstance(q, UniformQuantizer):
        lo, hi = _uniform_range(q)
        states = []
        for f in grids.factors:
            s, z = q.params_for_range(lo * f, hi * f)
            states.append({"scale": s.reshape(q.scale.shape).to(q.scale), "zero_point":
                           z.reshape(q.zero_point.shape).to(q.zero_point)})
        return Knob(name, q, states, list(grids.factors), per_channel and q.channel_axis is not None)
    if isinstance(q, TwinGeluQuantizer):
        states = [{"pos_scale": q.pos_scale * f} for f in grids.factors]
        return Knob(name, q, states, list(grids.factors))
    if isinstance(q, TwinSoftmaxQuantizer):
        states = [{"small_scale": torch.full_like(q.small_scale, q.small_scale_for_shift(k))}
                  for k in grids.twin_shifts]
        return Knob(name, q, states, [f"2^-{k}" for k in grids.twin_shifts])
    if isinstance(q, MPQQuantizer):
        states = [{"threshold": torch.full_like(q.threshold, t)} for t in grids.mpq_thresholds]
        return Knob(name, q, states, list(grids.mpq_thresholds))
    return None


@torch.no_grad()
def search_knobs(knobs: list[Knob], forward: Callable[[], torch.Tensor], metric: Callable, rounds: int,
                 channel_metric: Callable | None = None, before_knob: Callable[[Knob], None] | None = None) -> int:
    """Alternating grid search: each round, each knob in turn tries all its states with the others fixed
    and keeps the best by ``metric(forward())``; per-channel knobs use ``channel_metric`` (one error per
    output channel) and pick a state per channel. Stops early after a round without change; returns the
    number of rounds run."""
    done = 0
    for _ in range(rounds):
        done += 1
        changed = False
        for knob in knobs:
            if before_knob is not None:
                before_knob(knob)
            if knob.per_channel and channel_metric is not None:
                errs = []
                for i in range(len(knob.states)):
                    knob.apply(i)
                    errs.append(channel_metric(forward()))
                idx = torch.stack(errs).argmin(0)
                knob.apply_per_channel(idx)
                if knob.choice is None or not torch.equal(knob.choice, idx.cpu()):
                    changed = True
                knob.choice = idx.cpu()
            else:
                errs = []
                for i in range(len(knob.states)):
                    knob.apply(i)
                    errs.append(float(metric(forward())))
                best = min(range(len(errs)), key=errs.__getitem__)
                knob.apply(best)
                if knob.choice != best:
                    changed = True
                knob.choice = best
        if not changed:
            break
    return done


# -- PTQ4ViT per-layer search ----------------------------------------------------------------------------------


def swap_gelu_quantizers(model: nn.Module) -> list[str]:
    """Replace the (uniform) input quantizer of each MLP's fc2 that follows a GELU by a twin-GELU quantizer
    of the same bits and role; returns the names swapped."""
    swapped = []
    for n, m in model.named_modules():
        fc2, act = getattr(m, "fc2", None), getattr(m, "act", None)
        if isinstance(fc2, QLinear) and isinstance(act, nn.GELU) and isinstance(fc2.input_quant, UniformQuantizer):
            old = fc2.input_quant
            fc2.input_quant = TwinGeluQuantizer(old.bits, old.role).to(old.scale.device)
            swapped.append(f"{n}.fc2.input_quant")
    return swapped


def layerwise_search(model: nn.Module, cap: Capture, grids: Grids, rounds: int, device,
                     bar: Callable = lambda it, **kw: it) -> dict:
    """PTQ4ViT: for every weighted layer search (weight per channel, input) alternately, for every attention
    (q, k) on the scores and (softmax, v) on attention·V, each against the Hessian-guided distance of that
    op's output on float inputs. Returns {site: {distance ratio, choices, rounds}}."""
    trace = {}
    named = dict(model.named_modules())
    sites = []
    for n, d in cap.layers.items():
        sites.append(("layer", n, d))
    for n, d in cap.attn.items():
        sites.append(("qk", n, d))
        sites.append(("sv", n, d))
    for kind, n, d in bar(sites, desc="per-layer search", total=len(sites)):
        dev = {k: v.to(device) for k, v in d.items()}
        m = named[n]
        if kind == "layer":
            knobs = [make_knob(f"{n}.weight_quant", m.weight_quant, grids, per_channel=True),
                     make_knob(f"{n}.input_quant", m.input_quant, grids)]
            x, o, g2 = dev["x"], dev["o"], dev["g2"]
            cdim = 1 if isinstance(m, QConv2d) else -1

            def forward(m=m, x=x):
                return m(x)
            label = n
        elif kind == "qk":
            knobs = [make_knob(f"{n}.q_quant", m.q_quant, grids), make_knob(f"{n}.k_quant", m.k_quant, grids)]
            q, k, g2 = dev["q"], dev["k"], dev["g2_s"]
            o = (q * m.scale) @ k.transpose(-2, -1)
            cdim = None

            def forward(m=m, q=q, k=k):
                return (m.q_quant(q) * m.scale) @ m.k_quant(k).transpose(-2, -1)
            label = f"{n}[q@k]"
        else:
            knobs = [make_knob(f"{n}.softmax_quant", m.softmax_quant, grids),
                     make_knob(f"{n}.v_quant", m.v_quant, grids)]
            a, v, g2 = dev["a"], dev["v"], dev["g2_o"]
            o = a @ v
            cdim = None

            def forward(m=m, a=a, v=v):
                return m.softmax_quant(a) @ m.v_quant(v)
            label = f"{n}[softmax@v]"
        knobs = [kb for kb in knobs if kb is not None]
        with torch.no_grad():
            d0 = float(weighted_sq_error(o, forward(), g2))
        used = search_knobs(knobs, forward, lambda oh, o=o, g2=g2: weighted_sq_error(o, oh, g2), rounds,
                            channel_metric=(lambda oh, o=o, g2=g2, c=cdim: weighted_sq_error(o, oh, g2, c)))
        with torch.no_grad():
            d1 = float(weighted_sq_error(o, forward(), g2))
        trace[label] = {"distance_ratio": d1 / d0 if d0 > 0 else 1.0, "rounds": used,
                        "choices": {kb.name.rsplit(".", 1)[-1]: kb.describe() for kb in knobs}}
    return trace


# -- block pieces for APQ-ViT's block-output metric ------------------------------------------------------------


class BlockPieces:
    """A ViT ``QBlock`` split at the points where a search over its quantizers can reuse earlier results,
    evaluated only at the query-token rows ``idx`` (keys/values use all tokens, everything after the
    attention is per token). ``full(x, idx)`` equals ``block(x)[:, idx]``."""

    def __init__(self, block: QBlock):
        self.b = block
        self.a = block.attn

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.qkv(self.b.norm1(self.b.res_quant1(x)))

    def attend(self, qkv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = self.a
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = a.q_quant(q[:, :, idx])
        k, v = a.k_quant(k), a.v_quant(v)
        p = a.softmax_quant(a.score_quant((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = a.attn_drop(p) @ v
        return out.transpose(1, 2).reshape(B, idx.numel(), -1)

    def project(self, x: torch.Tensor, o: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b = self.b
        return b.res_quant1(x)[:, idx] + b.drop_path1(b.ls1(self.a.proj_drop(self.a.proj(o))))

    def mlp(self, y: torch.Tensor) -> torch.Tensor:
        b = self.b
        y = b.res_quant2(y)
        return y + b.drop_path2(b.ls2(b.mlp(b.norm2(y))))

    def full(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.project(x, self.attend(self.qkv(x), idx), idx))


def block_knob_stages(block: nn.Module, prefix: str, grids: Grids) -> list[list[Knob]]:
    """The block's searchable quantizers grouped by the piece that must be recomputed for them:
    [qkv weight/input], [q, k, softmax, v], [proj weight/input], [fc1, fc2 weight/input]."""
    a, mlp = block.attn, block.mlp
    groups = [[("attn.qkv.weight_quant", a.qkv.weight_quant), ("attn.qkv.input_quant", a.qkv.input_quant)],
              [("attn.q_quant", a.q_quant), ("attn.k_quant", a.k_quant), ("attn.softmax_quant", a.softmax_quant),
               ("attn.v_quant", a.v_quant)],
              [("attn.proj.weight_quant", a.proj.weight_quant), ("attn.proj.input_quant", a.proj.input_quant)],
              [("mlp.fc1.weight_quant", mlp.fc1.weight_quant), ("mlp.fc1.input_quant", mlp.fc1.input_quant),
               ("mlp.fc2.weight_quant", mlp.fc2.weight_quant), ("mlp.fc2.input_quant", mlp.fc2.input_quant)]]
    stages = []
    for g in groups:
        knobs = [make_knob(f"{prefix}.{n}", q, grids) for n, q in g]
        stages.append([k for k in knobs if k is not None])
    return stages
