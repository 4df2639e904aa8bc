"""PTQ-ViT (Liu et al., NeurIPS 2021; METHODS.md §3): similarity- and ranking-aware interval search, output
bias correction and nuclear-norm mixed precision.

The paper gives every searched tensor a signed symmetric quantizer: the weight and the input of each linear layer
(patch embedding, qkv, proj, fc1, fc2, head, Swin patch merging) and both inputs of the two attention matmuls (q
and k of QKᵀ, softmax output and v of attn·V). Inputs are per tensor (one Δ). Two inputs waste codes that way,
and by default get an unsigned grid instead: the softmax output, in [0, 1], gets zero point 0 (all 2^b codes on
[0, 1]; ``softmax_signed=True`` gives the paper's form: W6A6 agreement on DeiT-Tiny val 79.4 % signed, 86.0 %
unsigned), and every linear layer's input gets a zero point that covers its observed [min, max]
(``input_grid='asymmetric'``; ``'symmetric'`` is the paper's). The post-GELU input of fc2 lies in [−0.17, max],
so a signed grid leaves almost half its codes unused (W6A6 KL 0.205 symmetric, 0.184 asymmetric; BENCHMARKS.md
ptqvit section). The searched candidates scale the asymmetric grid about zero (Δ₀ = (max − min) / (2^b − 1),
zero point round(−min / Δ₀) fixed), the same one-parameter search as the paper's.

Weights are per output channel by default (``weight_granularity='channel'``) or per tensor as in the paper
(``'tensor'``): on DeiT-Tiny one Δ per weight tensor loses to every per-channel baseline at W6 and collapses at
W4 (BENCHMARKS.md, ptqvit section, both shown).

Per layer, with Δ₀ = max|·| / qmax for each operand (per weight row for per-channel weights), the two Δ are
searched alternately over C values spread linearly in [0.5Δ₀, 1.2Δ₀] (the "weight" side first: W, or k / v for
the matmuls), at most R rounds or until neither changes, maximizing the mean over calibration samples of the
Pearson correlation between the float and the quantized layer output. For QKᵀ the objective is
``mean Γ − γ·L_rank`` (see :func:`ranking_loss`). After every round the output-form bias correction subtracts
E[Ô − O] from the layer's bias. The state with the best objective seen (the initial one included) is kept, so
the search never ends worse than it started.

Per-channel weights: the candidates of a weight step are C factors f of every channel's own Δ₀_c (f on the
grid [0.5, 1.2]). By default (``channel_search='shared'``) one f is shared by all channels and chosen by the layer
objective, like the per-tensor search. Output channel c depends on Δ_c only, so the search could also separate by
channel: ``channel_search='own'`` also scores, from the same candidate outputs, each channel's own best f by its
output error over the cached tokens (its variance when bias correction will remove the mean, else the MSE) and
keeps it when the layer objective is higher. On DeiT-Tiny that overfits the calibration tokens (e.g. a class row
of the head is fitted on the few images of other classes; BENCHMARKS.md, ptqvit section: W8A8 agreement 88.2 %
with 'own' vs 91.0 % per tensor), so it is an option, not the default.

Speed: each layer's inputs and float outputs are cached once over the calibration images, on a seeded random
subset of ``tokens`` token positions per sample (linear layers) and of ``rows`` query rows per sample and head
(attention matmuls; all key columns are kept, since the ranking compares entries of a row). A candidate then
costs one small batched matmul on the cache instead of a model forward; candidates are evaluated in chunks.
Δ₀ uses the max over the full (not subsampled) tensors.

Calibration order: ``sequential`` (default; our reading of the paper's layer-by-layer Algorithm 1, as in
EasyQuant which it extends: each layer sees the inputs produced by the already-quantized earlier layers, while
the target is always the float model's output) or ``parallel`` (every layer sees float inputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.timm_vit import QAttention, QWindowAttention
from vitq.models.trunk import Trunk
from vitq.quant.base import EPS, int_range, quantizers_of
from vitq.quant.modules import QConv2d, QLinear, QWeighted
from vitq.quant.uniform import UniformQuantizer
from vitq.registry import merge_options, register_method

DEFAULTS = {
    "candidates": 100, "rounds": 20, "low": 0.5, "high": 1.2,
    "ranking": True, "gamma": 0.1, "theta": 0.2, "pairs": 256,
    "bias_corr": True, "calibration": "sequential",
    "images": None, "tokens": 64, "rows": 32, "softmax_signed": False,
    "mixed_precision": None, "mp_candidates": 20, "mp_rounds": 1, "mp_images": None, "mp_check": True,
    "fq_init": "omse", "chunk_elements": 2**23, "weight_granularity": "channel", "mp_sensitivity": "relative",
    "channel_search": "shared", "input_grid": "asymmetric",
}
CALIBRATION_MODES = ("sequential", "parallel")
WEIGHT_GRANULARITIES = ("channel", "tensor")
MP_SENSITIVITIES = ("relative", "raw", "softmax")
CHANNEL_SEARCHES = ("shared", "own")
INPUT_GRIDS = ("symmetric", "asymmetric")


# ---------------------------------------------------------------------------------------------------------------
# objective pieces (pure functions, tested directly)

def sym_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int, signed: bool = True,
              zero_point: int = 0) -> torch.Tensor:
    """Fake quantization identical to a per-tensor UniformQuantizer: signed symmetric, or unsigned with codes
    0..2^b − 1 and ``zero_point`` (0: the grid [0, (2^b − 1)·s]). A 1-D ``scale`` of C candidates gives a stacked
    result [C, *x.shape]."""
    lo, hi = int_range(bits, signed)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if s.dim() == 1:
        s = s.view(-1, *([1] * x.dim()))
        x = x.unsqueeze(0)
    q = torch.div(x, s).round_()
    if zero_point:
        return q.add_(zero_point).clamp_(lo, hi).sub_(zero_point).mul_(s)
    return q.clamp_(lo, hi).mul_(s)


def pearson(out_hat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per sample between ``out_hat`` [..., S, M] and ``out`` [S, M] -> [..., S]."""
    m = out.shape[-1]
    oc = out - out.mean(-1, keepdim=True)
    lead = out_hat.shape[:-2]
    h = out_hat.reshape(-1, *out_hat.shape[-2:])  # [c, S, M]
    num = torch.einsum("csm,sm->cs", h, oc)  # the centred target sums to zero, so Ô needs no centring here
    s1 = h.sum(-1)
    s2 = torch.einsum("csm,csm->cs", h, h)
    var_hat = (s2 - s1 * s1 / m).clamp_min(0.0)
    den = var_hat.sqrt() * oc.pow(2).sum(-1).sqrt()
    return (num / den.clamp_min(1e-12)).reshape(*lead, out.shape[0])


def ranking_loss(scores_hat: torch.Tensor, scores: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor,
                 theta: float) -> torch.Tensor:
    """PTQ-ViT ranking loss on attention scores [..., S, H, R, N] (float ``scores`` [S, H, R, N]).

    For each sampled pair (i, j) of entries of a row, Φ((Â_i − Â_j)·sign(A_i − A_j)) with Φ(p) = max(θ − p, 0).
    The paper sums over heads and all pairs; we sum over heads and take the mean over samples, rows and the
    sampled pairs, so the term has the same scale for any number of pairs (returns [...])."""
    sign = torch.sign(scores[..., pair_i] - scores[..., pair_j])
    diff = (scores_hat[..., pair_i] - scores_hat[..., pair_j]) * sign
    hinge = torch.clamp(theta - diff, min=0.0)  # [..., S, H, R, P]
    return hinge.mean(dim=(-4, -2, -1)).sum(-1)


def sample_pairs(n: int, pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` distinct unordered pairs i < j of 0..n-1 (all of them when there are fewer), seeded."""
    total = n * (n - 1) // 2
    if pairs <= 0 or pairs >= total:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    flat = torch.randperm(total, generator=gen)[:pairs].sort().values
    i, j = torch.triu_indices(n, n, offset=1)
    return i[flat], j[flat]


# ---------------------------------------------------------------------------------------------------------------
# layers: what is searched, and their cached data

@dataclass
class Layer:
    """One searched operation: ``kind`` linear (input A, weight B), qk (q, k) or av (softmax output, v)."""

    name: str
    kind: str
    module: nn.Module  # QLinear / QConv2d, or the attention module for qk / av
    a_attr: tuple[nn.Module, str]  # (parent, attribute) of the A-side quantizer
    b_attr: tuple[nn.Module, str]
    idx: torch.Tensor | None = None  # sampled token / row positions
    cache: dict = field(default_factory=dict)

    @property
    def a_quant(self) -> UniformQuantizer:
        return getattr(*self.a_attr)

    @property
    def b_quant(self) -> UniformQuantizer:
        return getattr(*self.b_attr)

    @property
    def block_part(self) -> str:
        return "mlp" if ".mlp." in f".{self.name}." else "msa" if ".attn" in f".{self.name}" else "other"


def find_layers(model: nn.Module) -> list[Layer]:
    """Searched layers in execution order (qkv, QKᵀ, attn·V, proj inside each attention)."""
    layers: list[Layer] = []
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QConv2d)):
            if isinstance(m, QConv2d) and m.groups != 1:
                raise VitqError(f"ptqvit: grouped convolution {name} is not supported (expected groups=1)")
            layers.append(Layer(name, "linear", m, (m, "input_quant"), (m, "weight_quant")))
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else None
            if isinstance(parent, (QAttention, QWindowAttention)) and name.endswith(".qkv"):
                layers.append(Layer(f"{parent_name}.matmul_qk", "qk", parent, (parent, "q_quant"),
                                    (parent, "k_quant")))
                layers.append(Layer(f"{parent_name}.matmul_av", "av", parent, (parent, "softmax_quant"),
                                    (parent, "v_quant")))
    return layers


def _tokens_of(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's input as [samples, tokens, features] (a conv's input as unfolded patches)."""
    m = layer.module
    if isinstance(m, QConv2d):
        k = m.weight.shape[-2:]
        return F.unfold(x, k, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _weight_matrix(m: QWeighted) -> torch.Tensor:
    return m.weight.detach().reshape(m.weight.shape[0], -1).float()


class _Stop(Exception):
    pass


class _Recorder:
    """Forward pre-hooks that record (subsampled) inputs of one or more layers during a segment forward."""

    def __init__(self, layers: list[Layer], tag: str, opts: dict, gen: torch.Generator, stop: bool):
        self.layers, self.tag, self.opts, self.gen, self.stop = layers, tag, opts, gen, stop
        self.handles = []
        self.pending: set = set()

    def _idx(self, layer: Layer, n: int, keep: int) -> torch.Tensor:
        if layer.idx is None:
            layer.idx = torch.arange(n) if n <= keep else torch.randperm(n, generator=self.gen)[:keep].sort().values
        return layer.idx

    def _store(self, layer: Layer, side: str, x: torch.Tensor, full: torch.Tensor) -> None:
        store = layer.cache.setdefault(self.tag, {"A": [], "B": [], "amax_A": 0.0, "amax_B": 0.0, "min_A": 0.0,
                                                  "max_A": 0.0})
        store[side].append(x.detach().float())
        mn, mx = (float(v) for v in torch.aminmax(full))  # one pass; |x|max follows from the two ends
        store[f"amax_{side}"] = max(store[f"amax_{side}"], -mn, mx)
        if side == "A":  # the full tensor's range, for an asymmetric input grid
            store["min_A"] = min(store["min_A"], mn)
            store["max_A"] = max(store["max_A"], mx)
        self.pending.discard((layer.name, side))
        if self.stop and not self.pending:
            raise _Stop

    def _hook(self, layer: Layer, side: str):
        def hook(_module, args):
            x = args[0].detach()
            if layer.kind == "linear":
                t = _tokens_of(layer, x.float())
                t = t[:, self._idx(layer, t.shape[1], self.opts["tokens"]).to(t.device)]
            elif side == "A":  # q rows or softmax rows [S, H, N, *]
                t = x[:, :, self._idx(layer, x.shape[2], self.opts["rows"]).to(x.device)]
            else:  # k or v, all tokens
                t = x
            self._store(layer, side, t, x)
        return hook

    def __enter__(self):
        for layer in self.layers:
            if layer.kind == "linear":
                self.handles.append(layer.module.register_forward_pre_hook(self._hook(layer, "A")))
                self.pending.add((layer.name, "A"))
            else:
                self.handles.append(layer.a_quant.register_forward_pre_hook(self._hook(layer, "A")))
                self.handles.append(layer.b_quant.register_forward_pre_hook(self._hook(layer, "B")))
                self.pending |= {(layer.name, "A"), (layer.name, "B")}
        self._all = set(self.pending)
        return self

    def reset(self):
        self.pending = set(self._all)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            store = layer.cache.get(self.tag)
            if store is not None and isinstance(store["A"], list):
                store["A"] = torch.cat(store["A"]) if store["A"] else None
                store["B"] = torch.cat(store["B"]) if store["B"] else None
        return False


class _PassThrough:
    def update(self, x):
        pass


class float_mode:
    """Inside, every quantizer of the model passes values through (uses the quantizer's observer slot)."""

    def __init__(self, model: nn.Module):
        self.qs = list(quantizers_of(model).values())

    def __enter__(self):
        self.saved = [q.observer for q in self.qs]
        for q in self.qs:
            q.observer = _PassThrough()
        return self

    def __exit__(self, *exc):
        for q, o in zip(self.qs, self.saved):
            q.observer = o
        return False


# ---------------------------------------------------------------------------------------------------------------
# the per-layer problem

class LayerProblem:
    """Cached operands of one layer and the objective of a pair of intervals (Δ_A, Δ_B)."""

    def __init__(self, layer: Layer, A: torch.Tensor, B: torch.Tensor, A_float: torch.Tensor,
                 B_float: torch.Tensor, a_bits: int, b_bits: int, amax_a: float, amax_b: float, opts: dict,
                 pairs: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None,
                 attn_scale: float = 1.0, a_signed: bool = True, b_signed: bool = True,
                 a_range: tuple[float, float] | None = None):
        self.layer, self.kind = layer, layer.kind
        self.a_signed, self.b_signed = a_signed, b_signed
        self.A, self.B = A, B
        self.a_bits, self.b_bits = a_bits, b_bits
        self.opts = opts
        self.attn_scale = attn_scale
        self.bias0 = None if bias is None else bias.detach().float().clone()
        self.bias = None if bias is None else self.bias0.clone()
        self.pairs = pairs if (self.kind == "qk" and opts["ranking"]) else None
        with torch.no_grad():
            self.target4 = self.apply(A_float.unsqueeze(0), B_float.unsqueeze(0), self.bias0)[0]
        self.target = self.target4.reshape(self.target4.shape[0], -1)
        self.a0 = max(amax_a / int_range(a_bits, a_signed)[1], EPS)
        self.a_zero = 0
        if a_range is not None:  # asymmetric A grid: Δ₀ covers [min, max] ∋ 0; candidates scale it about zero,
            lo, hi = min(a_range[0], 0.0), max(a_range[1], 0.0)  # so the zero point stays round(−min / Δ₀)
            qmax = int_range(a_bits, False)[1]
            self.a0 = max((hi - lo) / qmax, EPS)
            self.a_zero = int(min(max(round(-lo / self.a0), 0), qmax))
        # per-output-channel weights: Δ₀ per row of the weight matrix (B is [out, in]); else one Δ₀
        self.b_channel = self.kind == "linear" and getattr(layer.b_quant, "channel_axis", None) is not None
        if self.b_channel:
            self.b0 = (B.abs().amax(1) / int_range(b_bits, b_signed)[1]).clamp_min(EPS)
        else:
            self.b0 = max(amax_b / int_range(b_bits, b_signed)[1], EPS)

    def apply(self, Aq: torch.Tensor, Bq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Outputs for stacked operands Aq [ca, ...], Bq [cb, ...] (ca or cb is 1) -> [c, S, ...]."""
        if self.kind == "linear":
            ca, S, T, fin = Aq.shape
            cb, fout = Bq.shape[0], Bq.shape[1]
            if cb == 1:
                out = (Aq.reshape(-1, fin) @ Bq[0].t()).view(ca, S, T, fout)
            else:
                out = (Aq[0].reshape(-1, fin) @ Bq.reshape(cb * fout, fin).t()).view(S, T, cb, fout)
                out = out.permute(2, 0, 1, 3)
            return out + bias if bias is not None else out
        if self.kind == "qk":
            return torch.matmul(Aq * self.attn_scale, Bq.transpose(-1, -2))
        return torch.matmul(Aq, Bq)

    def _quant_b(self, scales: torch.Tensor) -> torch.Tensor:
        """Stacked quantized B for candidate intervals: [C] per tensor, or [C, out] per output channel."""
        if self.b_channel:
            lo, hi = int_range(self.b_bits, self.b_signed)
            s = scales.to(self.B).view(scales.shape[0], -1, 1)
            return torch.div(self.B.unsqueeze(0), s).round_().clamp_(lo, hi).mul_(s)
        return sym_quant(self.B, scales, self.b_bits, self.b_signed)

    def b_stack(self, b) -> torch.Tensor:
        """One B interval (a float, or a per-channel tensor) as a stack of one candidate."""
        return b.unsqueeze(0) if isinstance(b, torch.Tensor) else torch.tensor([b])

    def _quant_a(self, scales: torch.Tensor) -> torch.Tensor:
        return sym_quant(self.A, scales, self.a_bits, self.a_signed, self.a_zero)

    def score(self, out_hat: torch.Tensor) -> torch.Tensor:
        """Objective per candidate for outputs [c, S, ...]."""
        c, S = out_hat.shape[:2]
        obj = pearson(out_hat.reshape(c, S, -1), self.target).mean(-1)
        if self.pairs is not None:
            obj = obj - self.opts["gamma"] * ranking_loss(out_hat, self.target4, *self.pairs, self.opts["theta"])
        return obj

    def evaluate(self, side: str, scales: torch.Tensor, fixed, channel_error: str | None = None):
        """Objective for each candidate interval of ``side`` ('A' or 'B') with the other side at ``fixed``.

        With ``channel_error`` ('mse', or 'var' = the error's variance, i.e. what is left after the output bias
        correction removes its mean), also returns that error per candidate and output channel [C, out]."""
        per = max(self.target.numel(), (self.A if side == "A" else self.B).numel())
        chunk = max(1, self.opts["chunk_elements"] // max(per, 1))
        out, errs = [], []
        with torch.no_grad():
            if side == "B":
                Aq = self._quant_a(torch.tensor([fixed]))
                for i in range(0, len(scales), chunk):
                    o = self.apply(Aq, self._quant_b(scales[i:i + chunk]), self.bias)
                    out.append(self.score(o))
                    if channel_error is not None:
                        d = (o - self.target4).reshape(o.shape[0], -1, o.shape[-1])
                        errs.append(d.var(1, unbiased=False) if channel_error == "var" else d.pow(2).mean(1))
            else:
                Bq = self._quant_b(self.b_stack(fixed))
                for i in range(0, len(scales), chunk):
                    out.append(self.score(self.apply(self._quant_a(scales[i:i + chunk]), Bq, self.bias)))
        if channel_error is not None:
            return torch.cat(out), torch.cat(errs)
        return torch.cat(out)

    def objective(self, a: float, b) -> float:
        return float(self.evaluate("B", self.b_stack(b), a)[0])

    def output_error_mean(self, a: float, b) -> torch.Tensor:
        """E[Ô − O] per output channel over samples and tokens (linear layers)."""
        with torch.no_grad():
            out = self.apply(self._quant_a(torch.tensor([a])), self._quant_b(self.b_stack(b)), self.bias)[0]
            return (out - self.target4).reshape(-1, out.shape[-1]).mean(0)

    def _search_b(self, grid_b: torch.Tensor, a: float, centred: bool) -> tuple[float, object, str]:
        """Best B interval with A fixed at ``a``: (objective, interval, how). Per tensor: the best of the grid.
        Per channel: the best shared factor of the per-channel Δ₀ (by the layer objective), or each channel's own
        best factor by its output error (MSE; its variance when bias correction will remove the mean), whichever
        gives the higher layer objective."""
        if not self.b_channel:
            objs = self.evaluate("B", grid_b, a)
            k = int(torch.argmax(objs))
            return float(objs[k]), float(grid_b[k]), "tensor"
        if self.opts["channel_search"] == "shared":
            objs = self.evaluate("B", grid_b, a)
            k = int(torch.argmax(objs))
            return float(objs[k]), grid_b[k].clone(), "shared"
        objs, err = self.evaluate("B", grid_b, a, channel_error="var" if centred else "mse")
        k = int(torch.argmax(objs))
        own = grid_b.gather(0, err.argmin(0, keepdim=True))[0]
        own_obj = self.objective(a, own)
        if own_obj > float(objs[k]):
            return own_obj, own, "per-channel"
        return float(objs[k]), grid_b[k].clone(), "shared"

    def search(self, candidates: int, rounds: int, bias_corr: bool) -> dict:
        """Alternating interval search; returns the best state seen (the initial state included)."""
        opts = self.opts
        grid_a = torch.linspace(opts["low"] * self.a0, opts["high"] * self.a0, candidates)
        if self.b_channel:
            factors = torch.linspace(opts["low"], opts["high"], candidates, device=self.b0.device)
            grid_b = factors[:, None] * self.b0[None, :]  # [C, out]: candidate factors of each channel's Δ₀
        else:
            grid_b = torch.linspace(opts["low"] * self.b0, opts["high"] * self.b0, candidates)
        a, b = self.a0, self.b0
        how = "tensor" if not self.b_channel else "max"
        cur = init = self.objective(a, b)
        best = {"a": a, "b": b, "how": how, "objective": cur,
                "bias": None if self.bias is None else self.bias.clone()}
        done = 0
        correct = bias_corr and self.bias is not None and self.kind == "linear"
        for _ in range(rounds):
            done += 1
            changed = False
            obj_b, new_b, new_how = self._search_b(grid_b, a, centred=correct)
            if obj_b > cur:
                cur = obj_b
                changed |= not _same(new_b, b)
                b, how = new_b, new_how
            objs = self.evaluate("A", grid_a, b)
            k = int(torch.argmax(objs))
            if float(objs[k]) > cur:
                cur = float(objs[k])
                new = float(grid_a[k])
                changed |= new != a
                a = new
            if cur > best["objective"]:
                best = {"a": a, "b": b, "how": how, "objective": cur,
                        "bias": None if self.bias is None else self.bias.clone()}
            if correct:
                self.bias = self.bias - self.output_error_mean(a, b)
                cur = self.objective(a, b)
                if cur > best["objective"]:
                    best = {"a": a, "b": b, "how": how, "objective": cur, "bias": self.bias.clone()}
            if not changed:
                break
        self.bias = best["bias"]
        b_best = best["b"]
        factor = float((b_best / self.b0).mean()) if self.b_channel else b_best / self.b0
        return {"a_scale": best["a"], "a_zero": self.a_zero, "b_scale": b_best, "b_factor": factor,
                "b_search": best["how"], "objective": best["objective"], "init_objective": init, "rounds": done,
                "bias": best["bias"]}


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
    return x == y


# ---------------------------------------------------------------------------------------------------------------
# model-level driver

def _swap_layer_quantizers(layer: Layer, a_bits: int | None = None, b_bits: int | None = None,
                           softmax_signed: bool = True, weight_granularity: str = "tensor",
                           input_grid: str = "symmetric") -> None:
    """Give a layer signed symmetric quantizers (bits kept unless given): per tensor, except the weight of a
    linear layer when ``weight_granularity`` is 'channel' (one Δ per output channel). The softmax output is
    unsigned with zero point 0 when ``softmax_signed`` is False; a linear layer's input is unsigned with a zero
    point (set by the search) when ``input_grid`` is 'asymmetric'."""
    for (parent, attr), bits in ((layer.a_attr, a_bits), (layer.b_attr, b_bits)):
        old = getattr(parent, attr)
        signed = softmax_signed if old.role == "softmax" else True
        if layer.kind == "linear" and attr == "input_quant" and input_grid == "asymmetric":
            signed = False
        per_channel = {}
        if layer.kind == "linear" and attr == "weight_quant" and weight_granularity == "channel":
            per_channel = {"channel_axis": 0, "num_channels": layer.module.weight.shape[0]}
        new = UniformQuantizer(bits if bits is not None else old.bits, old.role, signed=signed, **per_channel)
        setattr(parent, attr, new.to(old.initialized.device))
    if layer.kind == "linear":
        layer.module.weight_correction.fill_(False)


def _write(layer: Layer, res: dict) -> None:
    for q, s, z in ((layer.a_quant, res["a_scale"], res.get("a_zero", 0)), (layer.b_quant, res["b_scale"], 0)):
        if isinstance(s, torch.Tensor):
            q.scale.copy_(s.reshape(q.scale.shape).to(q.scale))
        else:
            q.scale.fill_(s)
        q.zero_point.fill_(z)
        q.mark_initialized()
    if res.get("bias") is not None:
        with torch.no_grad():
            layer.module.bias.copy_(res["bias"].to(layer.module.bias))


def _segments(model: nn.Module, layers: list[Layer]) -> list[tuple[str, callable, list[Layer]]]:
    trunk = Trunk(model)
    units = [(n, m) for n, m in trunk.units]
    segs: list[tuple[str, callable, list[Layer]]] = [("stem", trunk.stem, [])]
    segs += [(n, m, []) for n, m in units]
    segs.append(("tail", trunk.tail, []))
    for layer in layers:
        for seg in segs[1:-1]:
            if layer.name.startswith(seg[0] + "."):
                seg[2].append(layer)
                break
        else:
            (segs[0] if layer.name.startswith("patch_embed") else segs[-1])[2].append(layer)
    return segs


def _run(fn, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(h) for h in hs]


def _record(fn, hs: list[torch.Tensor], layers: list[Layer], tag: str, opts: dict, gen: torch.Generator,
            stop: bool, keep_output: bool = True) -> list[torch.Tensor] | None:
    outs = []
    with _Recorder(layers, tag, opts, gen, stop) as rec:
        for h in hs:
            rec.reset()
            try:
                y = fn(h)
                if keep_output:
                    outs.append(y)
            except _Stop:
                pass
    return outs if keep_output else None


def _problem(layer: Layer, tag_input: str, opts: dict, pairs_gen: torch.Generator) -> LayerProblem:
    fl = layer.cache["float"]
    cur = layer.cache[tag_input]
    if layer.kind == "linear":
        B = _weight_matrix(layer.module)
        Bf, amax_b = B, float(B.abs().max())
        bias = layer.module.bias
    else:
        B, Bf, amax_b, bias = cur["B"], fl["B"], cur["amax_B"], None
    pairs = None
    if layer.kind == "qk" and opts["ranking"]:
        if "pairs" not in layer.cache:
            layer.cache["pairs"] = sample_pairs(B.shape[-2], opts["pairs"], pairs_gen)
        pairs = layer.cache["pairs"]
    scale = float(layer.module.scale) if layer.kind == "qk" else 1.0
    a_range = (cur["min_A"], cur["max_A"]) if layer.kind == "linear" and not layer.a_quant.signed else None
    return LayerProblem(layer, cur["A"], B, fl["A"], Bf, layer.a_quant.bits, layer.b_quant.bits, cur["amax_A"],
                        amax_b, opts, pairs, bias, attn_scale=scale, a_signed=layer.a_quant.signed,
                        b_signed=layer.b_quant.signed, a_range=a_range)


def _chunks(calib: CalibData, n: int | None) -> list[torch.Tensor]:
    imgs = calib.images if n is None else calib.images[:n]
    return [imgs[i:i + calib.batch_size].to(calib.device) for i in range(0, len(imgs), calib.batch_size)]


@torch.no_grad()
def _calibrate_all(model: nn.Module, calib: CalibData, layers: list[Layer], opts: dict) -> list[dict]:
    """The layer-by-layer search over the whole model (both calibration orders)."""
    gen = torch.Generator().manual_seed(calib.seed)
    pairs_gen = torch.Generator().manual_seed(calib.seed + 1)
    sequential = opts["calibration"] == "sequential"
    h_f = _chunks(calib, opts["images"])
    h_q = h_f
    trace = []
    segs = _segments(model, layers)
    for seg_name, fn, seg_layers in calib.bar(segs, "ptqvit", len(segs)):
        with float_mode(model):
            h_f_next = _record(fn, h_f, seg_layers, "float", opts, gen, stop=False)
        for layer in seg_layers:
            tag = "float"
            if sequential:
                _record(fn, h_q, [layer], "quant", opts, gen, stop=True, keep_output=False)
                tag = "quant"
            prob = _problem(layer, tag, opts, pairs_gen)
            res = prob.search(opts["candidates"], opts["rounds"], opts["bias_corr"])
            _write(layer, res)
            b_scale = res["b_scale"]
            trace.append({"layer": layer.name, "kind": layer.kind, "a_bits": layer.a_quant.bits,
                          "b_bits": layer.b_quant.bits, "a_scale": res["a_scale"], "a_zero": res["a_zero"],
                          "b_scale": None if isinstance(b_scale, torch.Tensor) else b_scale,
                          "b_factor": res["b_factor"], "b_search": res["b_search"],
                          "init_objective": res["init_objective"], "objective": res["objective"],
                          "rounds": res["rounds"]})
            layer.cache.clear()
            layer.idx = None
        if sequential and seg_name != "tail":
            h_q = _run(fn, h_q)
        h_f = h_f_next
        if not sequential:
            h_q = h_f
    return trace


# ---------------------------------------------------------------------------------------------------------------
# registration

def _adjust_scheme(scheme, options):
    import dataclasses

    return dataclasses.replace(scheme, weight_signed=True, softmax_quantizer=None)


def _add_arguments(group) -> None:
    d = DEFAULTS
    group.add_argument("--ptqvit-candidates", dest="ptqvit_candidates", type=int, default=None, metavar="C",
                       help=f"ptqvit: interval candidates per step, in [low·Δ₀, high·Δ₀] (default {d['candidates']})")
    group.add_argument("--ptqvit-rounds", dest="ptqvit_rounds", type=int, default=None, metavar="R",
                       help=f"ptqvit: at most R alternating rounds per layer (default {d['rounds']})")
    group.add_argument("--ptqvit-low", dest="ptqvit_low", type=float, default=None,
                       help=f"ptqvit: lower end of the candidate range, times Δ₀ (default {d['low']})")
    group.add_argument("--ptqvit-high", dest="ptqvit_high", type=float, default=None,
                       help=f"ptqvit: upper end of the candidate range, times Δ₀ (default {d['high']})")
    group.add_argument("--ptqvit-no-ranking", dest="ptqvit_no_ranking", action="store_true", default=None,
                       help="ptqvit: drop the ranking-aware term of the attention scores (ablation)")
    group.add_argument("--ptqvit-no-bias-corr", dest="ptqvit_no_bias_corr", action="store_true", default=None,
                       help="ptqvit: drop the output bias correction (ablation)")
    group.add_argument("--ptqvit-gamma", dest="ptqvit_gamma", type=float, default=None,
                       help=f"ptqvit: weight γ of the ranking loss (default {d['gamma']})")
    group.add_argument("--ptqvit-theta", dest="ptqvit_theta", type=float, default=None,
                       help=f"ptqvit: hinge margin θ of the ranking loss (default {d['theta']})")
    group.add_argument("--ptqvit-pairs", dest="ptqvit_pairs", type=int, default=None, metavar="P",
                       help=f"ptqvit: pairs (i<j) of a score row sampled once per layer, shared by all rows; "
                            f"0 = all pairs (default {d['pairs']})")
    group.add_argument("--ptqvit-calibration", dest="ptqvit_calibration", choices=CALIBRATION_MODES, default=None,
                       help="ptqvit: layer inputs from the already-quantized earlier layers (sequential, default) "
                            "or from the float model (parallel)")
    group.add_argument("--ptqvit-weight-granularity", dest="ptqvit_weight_granularity", choices=WEIGHT_GRANULARITIES,
                       default=None,
                       help="ptqvit: one weight interval per output channel (channel, default: wins on held-out "
                            "images at W6) or per tensor (tensor, the paper's)")
    group.add_argument("--ptqvit-softmax-signed", dest="ptqvit_softmax_signed", action="store_true", default=None,
                       help="ptqvit: quantize the softmax output with a signed symmetric quantizer as the paper does "
                            "(default: unsigned with zero point 0, since it lies in [0, 1]; the signed grid wastes "
                            "half its codes)")
    group.add_argument("--ptqvit-input-grid", dest="ptqvit_input_grid", choices=INPUT_GRIDS, default=None,
                       help="ptqvit: grid of every linear layer's input, per tensor: unsigned with a zero point "
                            "covering the observed [min, max], scaled about zero by the search (asymmetric, default: "
                            "the post-GELU fc2 input uses all codes) or signed symmetric (symmetric, the paper's)")
    group.add_argument("--ptqvit-channel-search", dest="ptqvit_channel_search", choices=CHANNEL_SEARCHES,
                       default=None,
                       help="ptqvit per-channel weights: one factor of every channel's max shared by all channels "
                            "(shared, default), or also each channel's own factor by its output error (own; "
                            "overfits the calibration tokens on DeiT-Tiny)")
    group.add_argument("--ptqvit-mp-sensitivity", dest="ptqvit_mp_sensitivity", choices=MP_SENSITIVITIES,
                       default=None,
                       help="ptqvit mixed precision: module sensitivity sigma = nuclear norm of the QK^T scores (MSA) "
                            "or of the output (MLP), each divided by its mean over the model's MSAs / MLPs "
                            "(relative, default), unnormalised (raw), or the old post-softmax-map form (softmax)")
    group.add_argument("--ptqvit-mp-no-check", dest="ptqvit_mp_no_check", action="store_true", default=None,
                       help="ptqvit mixed precision: keep the program's allocation even when it gives a larger KL "
                            "to float than the uniform allocation of the same size on the allocation images "
                            "(ablation; by default the uniform one is used then)")
    group.add_argument("--ptqvit-images", dest="ptqvit_images", type=int, default=None, metavar="N",
                       help="ptqvit: use the first N calibration images for the search (default: all)")
    group.add_argument("--ptqvit-tokens", dest="ptqvit_tokens", type=int, default=None, metavar="T",
                       help=f"ptqvit: token positions cached per sample for linear layers (default {d['tokens']})")
    group.add_argument("--ptqvit-rows", dest="ptqvit_rows", type=int, default=None, metavar="R",
                       help=f"ptqvit: query rows cached per sample and head for the attention matmuls "
                            f"(default {d['rows']})")
    group.add_argument("--mixed-precision", dest="ptqvit_mixed_precision", type=int, default=None, metavar="BITS",
                       help="ptqvit: mixed precision with this average weight bit width (e.g. 6 or 8): one bit "
                            "width per block MSA and MLP from {BITS-2..BITS+2}")
    group.add_argument("--ptqvit-mp-candidates", dest="ptqvit_mp_candidates", type=int, default=None,
                       help=f"ptqvit: candidates of the reduced search that estimates Ω (default {d['mp_candidates']})")
    group.add_argument("--ptqvit-mp-rounds", dest="ptqvit_mp_rounds", type=int, default=None,
                       help=f"ptqvit: rounds of the reduced search that estimates Ω (default {d['mp_rounds']})")


def resolve_options(options: dict) -> dict:
    opts = merge_options("ptqvit", options, DEFAULTS,
                         {"no_ranking": "ranking", "no_bias_corr": "bias_corr", "mp_no_check": "mp_check"})
    if opts["weight_granularity"] not in WEIGHT_GRANULARITIES:
        raise VitqError(f"ptqvit: weight granularity {opts['weight_granularity']!r} "
                        f"(expected one of {', '.join(WEIGHT_GRANULARITIES)})")
    if opts["channel_search"] not in CHANNEL_SEARCHES:
        raise VitqError(f"ptqvit: per-channel weight search {opts['channel_search']!r} "
                        f"(expected one of {', '.join(CHANNEL_SEARCHES)})")
    if opts["input_grid"] not in INPUT_GRIDS:
        raise VitqError(f"ptqvit: input grid {opts['input_grid']!r} (expected one of {', '.join(INPUT_GRIDS)})")
    if opts["mp_sensitivity"] not in MP_SENSITIVITIES:
        raise VitqError(f"ptqvit: mixed-precision sensitivity {opts['mp_sensitivity']!r} "
                        f"(expected one of {', '.join(MP_SENSITIVITIES)})")
    if opts["calibration"] not in CALIBRATION_MODES:
        raise VitqError(f"ptqvit: calibration {opts['calibration']!r} (expected one of {', '.join(CALIBRATION_MODES)})")
    for k in ("candidates", "rounds", "tokens", "rows", "mp_candidates", "mp_rounds"):
        if not isinstance(opts[k], int) or opts[k] < 1:
            raise VitqError(f"--ptqvit-{k.replace('_', '-')} {opts[k]!r} is invalid (expected a positive integer)")
    if not 0 < opts["low"] < opts["high"]:
        raise VitqError(f"ptqvit: candidate range [{opts['low']}, {opts['high']}] (expected 0 < low < high)")
    mp = opts["mixed_precision"]
    if mp is not None and (not isinstance(mp, int) or not 4 <= mp <= 8):
        raise VitqError(f"mixed precision target {mp!r} (expected an integer average bit width 4..8, e.g. 6 or 8)")
    for k in ("images", "mp_images"):
        if opts[k] is not None and (not isinstance(opts[k], int) or opts[k] < 1):
            raise VitqError(f"ptqvit: {k} = {opts[k]!r} (expected a positive integer)")
    return opts


@register_method("ptqvit", "PTQ-ViT (Liu et al. 2021): per-layer Pearson/ranking-aware search of per-tensor "
                 "input and per-channel weight intervals, output bias correction, optional nuclear-norm mixed "
                 "precision (--mixed-precision)",
                 add_arguments=_add_arguments, adjust_scheme=_adjust_scheme, validate=lambda o: resolve_options(o),
                 quick_options={"candidates": 8, "rounds": 1, "images": 16, "tokens": 16, "rows": 16, "pairs": 64},
                 expected_time="DeiT-Tiny, 16 images: 5-7 s on 2 CPU cores with 20 candidates, 3 rounds, 16 tokens "
                               "and rows, 128 pairs; mixed precision ~14 s (BENCHMARKS.md ptqvit); at the defaults "
                               "on all images not measured; GPU not measured")
def ptqvit(model: nn.Module, calib: CalibData, **options) -> dict:
    opts = resolve_options(options)
    scheme = getattr(model, "vitq_scheme", None)
    fq = bool(scheme is not None and scheme.fully_quantized)
    info: dict = {}
    t0 = time.perf_counter()
    if fq:
        from vitq.methods.baselines import calibrate_observed

        calibrate_observed(model, calib, opts["fq_init"], "minmax")
        info["fq_only_quantizers"] = (f"scores, LayerNorm-input and residual (PTF) quantizers: observer-based "
                                      f"{opts['fq_init']} over all calibration images (not searched)")
    layers = find_layers(model)
    for la in layers:
        _swap_layer_quantizers(la, softmax_signed=opts["softmax_signed"], weight_granularity=opts["weight_granularity"],
                               input_grid=opts["input_grid"])
    if opts["mixed_precision"] is not None:
        t1 = time.perf_counter()
        from vitq.methods.ptqvit_mp import allocate

        info["mixed_precision"] = allocate(model, calib, layers, opts, opts["mixed_precision"])
        info["mixed_precision"]["seconds"] = time.perf_counter() - t1
    layers = find_layers(model)
    t2 = time.perf_counter()
    trace = _calibrate_all(model, calib, layers, opts)
    n_images = len(calib) if opts["images"] is None else min(opts["images"], len(calib))
    inits = [t["init_objective"] for t in trace]
    finals = [t["objective"] for t in trace]
    info.update({
        "regime": scheme.name if scheme is not None else None,
        "options": {k: v for k, v in opts.items()},
        "calibration_inputs": ("sequential: each layer's inputs come from the already-quantized earlier layers"
                               if opts["calibration"] == "sequential"
                               else "parallel: each layer's inputs come from the float model"),
        "weight_granularity": opts["weight_granularity"],
        "quantizers": ("signed symmetric per-tensor for every searched weight and input"
                       if opts["weight_granularity"] == "tensor" else
                       "signed symmetric: per output channel for the weights of linear layers, per tensor for every "
                       "searched input (and q, k, softmax output, v)")
                      + ("" if opts["softmax_signed"] else " (softmax output unsigned)")
                      + ("" if opts["input_grid"] == "symmetric" else
                         " (linear-layer inputs unsigned with a zero point: asymmetric per tensor)"),
        "weight_search": ("one interval per weight tensor on the grid [low, high] x max|W| / qmax"
                          if opts["weight_granularity"] == "tensor" else
                          "per output channel c, intervals f * max|W_c| / qmax with one f shared by all channels on "
                          "the grid [low, high], chosen by the layer objective"
                          if opts["channel_search"] == "shared" else
                          "per output channel c, intervals f * max|W_c| / qmax with f on the grid [low, high]: each "
                          "step keeps the better (by the layer objective) of one shared f, and each channel's own f "
                          "by its output error (variance of the error with bias correction, else MSE)"),
        "search_images": n_images,
        "objective": "mean per-sample Pearson correlation of float and quantized layer outputs; "
                     "QK^T: minus gamma * ranking loss" if opts["ranking"] else
                     "mean per-sample Pearson correlation of float and quantized layer outputs",
        "ranking_pairs": ("per QK^T layer, `pairs` random pairs i<j of key positions drawn once (seeded) and shared "
                          "by every sampled query row, head and image; hinge mean over pairs, rows, images; sum "
                          "over heads"),
        "subsampling": (f"{opts['tokens']} random token positions per sample for linear layers, {opts['rows']} "
                        "random query rows per sample and head for the attention matmuls (same positions for "
                        "every sample of a layer); interval init from the max over full tensors"),
        "mean_init_objective": sum(inits) / max(len(inits), 1),
        "mean_objective": sum(finals) / max(len(finals), 1),
        "search_seconds": time.perf_counter() - t2,
        "layers": trace,
    })
    info["total_seconds_inner"] = time.perf_counter() - t0
    return info
