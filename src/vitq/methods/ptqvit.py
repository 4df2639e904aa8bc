"""PTQ-ViT (Liu et al., NeurIPS 2021; METHODS.md §3): similarity- and ranking-aware interval search, output
bias correction and nuclear-norm mixed precision.

Every searched tensor uses a signed symmetric quantizer: the weight and the input of each linear layer (patch
embedding, qkv, proj, fc1, fc2, head, Swin patch merging) and both inputs of the two attention matmuls (q and k
of QKᵀ, softmax output and v of attn·V). Inputs are per tensor (one Δ). The softmax output lies in [0, 1], so
by default its quantizer is unsigned with zero point 0 (all 2^b codes on [0, 1]); ``softmax_signed=True`` gives
the paper's signed form, which wastes half the codes (W6A6 agreement on DeiT-Tiny val 79.4 % signed, 86.0 %
unsigned, BENCHMARKS.md ptqvit section). Weights are per output channel by default
(``weight_granularity='channel'``) or per tensor as in the paper (``'tensor'``): on DeiT-Tiny one Δ per weight
tensor loses to every per-channel baseline at W6 and collapses at W4 (BENCHMARKS.md, ptqvit section, both shown).

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
from vitq.modules import QAttention, QConv2d, QLinear, QWindowAttention, _QWeighted
from vitq.quantizers import EPS, Quantizer, UniformQuantizer, int_range, quantizers_of
from vitq.registry import merge_options, register_method
from vitq.trunk import Trunk

DEFAULTS = {
    "candidates": 100, "rounds": 20, "low": 0.5, "high": 1.2,
    "ranking": True, "gamma": 0.1, "theta": 0.2, "pairs": 256,
    "bias_corr": True, "calibration": "sequential",
    "images": None, "tokens": 64, "rows": 32, "softmax_signed": False,
    "mixed_precision": None, "mp_candidates": 20, "mp_rounds": 1, "mp_images": None, "mp_check": True,
    "fq_init": "omse", "chunk_elements": 2**23, "weight_granularity": "channel", "mp_sensitivity": "relative",
    "channel_search": "shared",
}
CALIBRATION_MODES = ("sequential", "parallel")
WEIGHT_GRANULARITIES = ("channel", "tensor")
MP_SENSITIVITIES = ("relative", "raw", "softmax")
CHANNEL_SEARCHES = ("shared", "own")


# ---------------------------------------------------------------------------------------------------------------
# objective pieces (pure functions, tested directly)

def sym_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int, signed: bool = True) -> torch.Tensor:
    """Zero-point-free fake quantization, identical to a per-tensor UniformQuantizer with zero point 0 (signed
    symmetric, or unsigned [0, (2^b − 1)·s]). A 1-D ``scale`` of C candidates gives a stacked result
    [C, *x.shape]."""
    lo, hi = int_range(bits, signed)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if s.dim() == 1:
        s = s.view(-1, *([1] * x.dim()))
        x = x.unsqueeze(0)
    q = torch.div(x, s)
    return q.round_().clamp_(lo, hi).mul_(s)


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


def _weight_matrix(m: _QWeighted) -> torch.Tensor:
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

    def _store(self, layer: Layer, side: str, x: torch.Tensor, full_absmax: torch.Tensor) -> None:
        store = layer.cache.setdefault(self.tag, {"A": [], "B": [], "amax_A": 0.0, "amax_B": 0.0})
        store[side].append(x.detach().float())
        store[f"amax_{side}"] = max(store[f"amax_{side}"], float(full_absmax))
        self.pending.discard((layer.name, side))
        if self.stop and not self.pending:
            raise _Stop

    def _hook(self, layer: Layer, side: str):
        def hook(_module, args):
            x = args[0].detach()
            amax = x.abs().max()
            if layer.kind == "linear":
                t = _tokens_of(layer, x.float())
                t = t[:, self._idx(layer, t.shape[1], self.opts["tokens"]).to(t.device)]
            elif side == "A":  # q rows or softmax rows [S, H, N, *]
                t = x[:, :, self._idx(layer, x.shape[2], self.opts["rows"]).to(x.device)]
            else:  # k or v, all tokens
                t = x
            self._store(layer, side, t, amax)
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
                 attn_scale: float = 1.0, a_signed: bool = True, b_signed: bool = True):
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
        return sym_quant(self.A, scales, self.a_bits, self.a_signed)

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
        return {"a_scale": best["a"], "b_scale": b_best, "b_factor": factor, "b_search": best["how"],
                "objective": best["objective"], "init_objective": init, "rounds": done, "bias": best["bias"]}


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
    return x == y


# ---------------------------------------------------------------------------------------------------------------
# model-level driver

def _swap_layer_quantizers(layer: Layer, a_bits: int | None = None, b_bits: int | None = None,
                           softmax_signed: bool = True, weight_granularity: str = "tensor") -> None:
    """Give a layer signed symmetric quantizers (bits kept unless given; the softmax output may be unsigned with
    zero point 0 when ``softmax_signed`` is False): per tensor, except the weight of a linear layer when
    ``weight_granularity`` is 'channel' (one Δ per output channel)."""
    for (parent, attr), bits in ((layer.a_attr, a_bits), (layer.b_attr, b_bits)):
        old = getattr(parent, attr)
        signed = softmax_signed if old.role == "softmax" else True
        per_channel = {}
        if layer.kind == "linear" and attr == "weight_quant" and weight_granularity == "channel":
            per_channel = {"channel_axis": 0, "num_channels": layer.module.weight.shape[0]}
        new = UniformQuantizer(bits if bits is not None else old.bits, old.role, signed=signed, **per_channel)
        setattr(parent, attr, new.to(old.initialized.device))
    if layer.kind == "linear":
        layer.module.weight_correction.fill_(False)


def _write(layer: Layer, res: dict) -> None:
    for q, s in ((layer.a_quant, res["a_scale"]), (layer.b_quant, res["b_scale"])):
        if isinstance(s, torch.Tensor):
            q.scale.copy_(s.reshape(q.scale.shape).to(q.scale))
        else:
            q.scale.fill_(s)
        q.zero_point.zero_()
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
    return LayerProblem(layer, cur["A"], B, fl["A"], Bf, layer.a_quant.bits, layer.b_quant.bits, cur["amax_A"],
                        amax_b, opts, pairs, bias, attn_scale=scale, a_signed=layer.a_quant.signed,
                        b_signed=layer.b_quant.signed)


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
                          "b_bits": layer.b_quant.bits, "a_scale": res["a_scale"],
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
# mixed precision

def mp_candidates(target: int) -> list[int]:
    """Candidate bit widths for an average target (paper: {4..8} for 6, {6..10} for 8)."""
    return list(range(target - 2, target + 3))


def solve_allocation(omega: list[list[float]], sizes: list[int], cand_bits: list[int], budget_bits: float) -> list[int]:
    """Exact choice of one bit width per module minimizing Σ Ω[m][k] subject to Σ sizes[m]·bits ≤ budget_bits,
    as a 0/1 integer program solved by ``scipy.optimize.milp``. Returns the index into ``cand_bits`` per
    module."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    M, K = len(sizes), len(cand_bits)
    c = np.asarray(omega, dtype=float).reshape(-1)
    scale = max(float(np.abs(c).max()), 1e-30)
    eq = np.zeros((M, M * K))
    for m in range(M):
        eq[m, m * K:(m + 1) * K] = 1.0
    size_row = np.array([sizes[m] * cand_bits[k] for m in range(M) for k in range(K)], dtype=float)
    cons = [LinearConstraint(eq, 1.0, 1.0), LinearConstraint(size_row[None, :], -np.inf, float(budget_bits))]
    res = milp(c / scale, constraints=cons, integrality=np.ones(M * K), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise VitqError(f"mixed precision: no allocation meets the size budget ({res.message}); "
                        "expected a target at least the smallest candidate bit width")
    x = np.round(res.x).reshape(M, K)
    return [int(np.argmax(x[m])) for m in range(M)]


def _module_groups(model: nn.Module, layers: list[Layer]) -> list[dict]:
    """Per transformer block, its MSA and MLP as units of the allocation."""
    trunk = Trunk(model)
    groups = []
    for _, bname, block in trunk.blocks():
        for part, mod_attr in (("msa", "attn"), ("mlp", "mlp")):
            prefix = f"{bname}.{mod_attr}."
            ls = [la for la in layers if la.name.startswith(prefix)]
            groups.append({"name": f"{bname}.{mod_attr}", "part": part, "block": block,
                           "module": getattr(block, mod_attr), "layers": ls,
                           "weights": sum(la.module.weight.numel() for la in ls if la.kind == "linear")})
    return groups


def _io_hook(rec: dict):
    def hook(_module, args, kwargs, out):
        rec["x"].append((args, kwargs))
        rec["y"].append(out)
    return hook


def _nuc_hook(rec: dict, key: str, heads: str):
    def hook(_module, args):
        # a map per head [S, H, N, N]: nuclear norm per head, then the sum or the mean over heads -> [S]
        n = torch.linalg.matrix_norm(args[0].float(), ord="nuc")
        rec[key].append(n.sum(1) if heads == "sum" else n.mean(1))
    return hook


def module_sensitivity(raw_qk: list[float], raw_softmax: list[float], parts: list[str], mode: str) -> list[float]:
    """σ per module from its nuclear norms (MLP modules: the output's; MSA modules: the QKᵀ scores' in
    ``raw_qk``, the post-softmax map's in ``raw_softmax``).

    ``relative`` (default): each module's nuclear norm (QKᵀ scores for an MSA, the paper's attention map; the
    output for an MLP) divided by the mean of that norm over the model's modules of the same kind. The nuclear
    norms of attention scores and of MLP features have no common unit (on DeiT-Tiny the QKᵀ norms are 1.1–4.8×
    the MLP ones, the old softmax-map norms 9–14× smaller), so only their relative size within a kind can carry
    the paper's signal: which blocks are more sensitive than the others. Both errors ‖Ŷ − Y‖² are measured on
    the module output that is added to the residual stream, so with a σ of mean 1 per kind Ω compares MSA and MLP
    error on one scale. ``raw``: the unnormalised nuclear norms (QKᵀ / output). ``softmax``: the first version
    (sum over heads of the post-softmax map's nuclear norm; starved the MSAs of bits)."""
    if mode == "softmax":
        return list(raw_softmax)
    if mode == "raw":
        return list(raw_qk)
    out = []
    for s, p in zip(raw_qk, parts):
        same = [r for r, q in zip(raw_qk, parts) if q == p]
        out.append(s / max(sum(same) / len(same), 1e-30))
    return out


def _kl_to_float(logits: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean KL(float ‖ quant) of the softmax outputs over all images."""
    total, n = 0.0, 0
    for q, f in zip(logits, ref):
        lp_f, lp_q = F.log_softmax(f.float(), -1), F.log_softmax(q.float(), -1)
        total += float((lp_f.exp() * (lp_f - lp_q)).sum())
        n += f.shape[0]
    return total / max(n, 1)


def _composed_kl(model: nn.Module, images: list[torch.Tensor], ref: list[torch.Tensor], groups: list[dict],
                 variants: list[dict], bits: list[int]) -> float:
    """KL to float of the model whose modules use, together, the quantizers their Ω was measured with at the
    given bit widths (every other quantizer passes through)."""
    saved = []
    for g, var, b in zip(groups, variants, bits):
        for la in g["layers"]:
            saved.append((la, getattr(*la.a_attr), getattr(*la.b_attr)))
            a_q, b_q = var[b][la.name]
            setattr(*la.a_attr, a_q)
            setattr(*la.b_attr, b_q)
    try:
        with _only_quantizing(model, [la for g in groups for la in g["layers"]]):
            out = [model(x) for x in images]
    finally:
        for la, a_q, b_q in saved:
            setattr(*la.a_attr, a_q)
            setattr(*la.b_attr, b_q)
    return _kl_to_float(out, ref)


@torch.no_grad()
def _allocate(model: nn.Module, calib: CalibData, layers: list[Layer], opts: dict, target: int) -> dict:
    """Sensitivity σ (nuclear norms), Ω per module and bit width (from a reduced search on float inputs), the
    exact allocation under the size budget, and the check against the uniform allocation of the same size.

    Check (``mp_check``, default on): the uniform allocation (every module at the target bits) is feasible, so
    the program's optimum has Σ Ω no larger than its (verified; a solver failure would fall back). Ω is a proxy,
    though, so the two allocations are also compared on the model: every module takes the quantizers its Ω was
    measured with, all modules at once, and the KL(float ‖ quant) of the logits on the allocation images decides;
    the uniform allocation is used when the chosen one is worse. Both figures and the outcome are recorded."""
    trunk = Trunk(model)
    groups = _module_groups(model, layers)
    cand = mp_candidates(target)
    grouped = {id(la) for g in groups for la in g["layers"]}
    fixed = [la for la in layers if la.kind == "linear" and id(la) not in grouped]
    fixed_bits = sum(la.module.weight.numel() * la.b_quant.bits for la in fixed)
    fixed_n = sum(la.module.weight.numel() for la in fixed)
    sizes = [g["weights"] for g in groups]
    budget = target * (sum(sizes) + fixed_n) - fixed_bits
    gen = torch.Generator().manual_seed(calib.seed + 7)
    pairs_gen = torch.Generator().manual_seed(calib.seed + 8)
    n_img = opts["mp_images"] if opts["mp_images"] is not None else opts["images"]
    images = _chunks(calib, n_img)
    with float_mode(model):
        h = _run(trunk.stem, images)
    by_block = {id(g["block"]): [] for g in groups}
    for g in groups:
        by_block[id(g["block"])].append(g)
    errors, raw_qk, raw_softmax, variants = [], [], [], []
    for _name, unit in calib.bar(trunk.units, "ptqvit allocation", len(trunk.units)):
        gs = by_block.get(id(unit), [])
        if not gs:
            with float_mode(model):
                h = _run(unit, h)
            continue
        io: dict[str, dict] = {g["name"]: {"x": [], "y": [], "qk": [], "softmax": []} for g in gs}
        hooks = []
        for g in gs:
            rec = io[g["name"]]
            hooks.append(g["module"].register_forward_hook(_io_hook(rec), with_kwargs=True))
            if g["part"] == "msa":
                hooks.append(g["module"].score_quant.register_forward_pre_hook(_nuc_hook(rec, "qk", "mean")))
                hooks.append(g["module"].softmax_quant.register_forward_pre_hook(_nuc_hook(rec, "softmax", "sum")))
        try:
            with float_mode(model):
                seg_layers = [la for g in gs for la in g["layers"]]
                h_next = _record(unit, h, seg_layers, "float", opts, gen, stop=False)
        finally:
            for hk in hooks:
                hk.remove()
        for g in gs:
            rec = io[g["name"]]
            xs, ys = rec["x"], rec["y"]
            if g["part"] == "msa":
                raw_qk.append(float(torch.cat(rec["qk"]).mean()))
                raw_softmax.append(float(torch.cat(rec["softmax"]).mean()))
            else:
                y = torch.cat(ys).float()
                s = float(torch.linalg.matrix_norm(y.reshape(y.shape[0], -1, y.shape[-1]), ord="nuc").mean())
                raw_qk.append(s)
                raw_softmax.append(s)
            row, var = [], {}
            for bits in cand:
                saved = {}
                for la in g["layers"]:
                    saved[la.name] = (getattr(*la.a_attr), getattr(*la.b_attr))
                    _swap_layer_quantizers(la, bits, bits, opts["softmax_signed"], opts["weight_granularity"])
                for la in g["layers"]:
                    prob = _problem(la, "float", opts, pairs_gen)
                    res = prob.search(opts["mp_candidates"], opts["mp_rounds"], bias_corr=False)
                    res["bias"] = None
                    _write(la, res)
                err = 0.0
                for (args, kwargs), y in zip(xs, ys):
                    with _only_quantizing(model, g["layers"]):
                        err += float((g["module"](*args, **kwargs) - y).float().pow(2).sum())
                row.append(err / sum(y.shape[0] for y in ys))
                var[bits] = {la.name: (getattr(*la.a_attr), getattr(*la.b_attr)) for la in g["layers"]}
                for la in g["layers"]:
                    a_old, b_old = saved[la.name]
                    setattr(*la.a_attr, a_old)
                    setattr(*la.b_attr, b_old)
            errors.append(row)
            variants.append(var)
            for la in g["layers"]:
                la.cache.clear()
                la.idx = None
        h = h_next
    sigma = module_sensitivity(raw_qk, raw_softmax, [g["part"] for g in groups], opts["mp_sensitivity"])
    omega = [[s * e for e in row] for s, row in zip(sigma, errors)]
    choice = solve_allocation(omega, sizes, cand, budget)
    chosen_bits = [cand[k] for k in choice]
    omega_total = sum(omega[m][k] for m, k in enumerate(choice))
    check: dict = {"kl_check": bool(opts["mp_check"]), "omega_chosen": omega_total}
    uniform_ok = target in cand and target * sum(sizes) <= budget * (1 + 1e-12)
    fallback = None
    if uniform_ok:
        k_u = cand.index(target)
        check["omega_uniform"] = sum(row[k_u] for row in omega)
        if omega_total > check["omega_uniform"] * (1 + 1e-9):
            fallback = "the program's allocation has a larger sum of Omega than uniform (solver failure)"
        if opts["mp_check"]:
            with float_mode(model):
                ref = [model(x) for x in images]
            check["kl_chosen"] = _composed_kl(model, images, ref, groups, variants, chosen_bits)
            check["kl_uniform"] = _composed_kl(model, images, ref, groups, variants, [target] * len(groups))
            if fallback is None and check["kl_chosen"] > check["kl_uniform"]:
                fallback = "the program's allocation gives a larger KL to float than uniform on the allocation images"
    else:
        check["note"] = ("the uniform allocation at the target exceeds the size budget (layers outside the blocks "
                         "have more bits than the target): nothing to compare with")
    check["fallback_to_uniform"] = fallback is not None
    check["reason"] = fallback or ("the program's allocation is no worse than uniform" if uniform_ok else "")
    ilp_bits = {g["name"]: b for g, b in zip(groups, chosen_bits)}
    if fallback is not None:
        choice = [cand.index(target)] * len(groups)
    bits = {g["name"]: cand[k] for g, k in zip(groups, choice)}
    for g in groups:
        for la in g["layers"]:
            _swap_layer_quantizers(la, bits[g["name"]], bits[g["name"]], opts["softmax_signed"],
                                   opts["weight_granularity"])
    total_bits = fixed_bits + sum(sizes[i] * cand[k] for i, k in enumerate(choice))
    total_n = fixed_n + sum(sizes)
    sigma_defs = {
        "relative": "nuclear norm (MSA: of the QK^T scores per head, mean over heads; MLP: of the output [N, C]), "
                    "mean over images, divided by its mean over the model's modules of the same kind",
        "raw": "nuclear norm (MSA: of the QK^T scores per head, mean over heads; MLP: of the output [N, C]), mean "
               "over images",
        "softmax": "MSA: mean over images of the sum over heads of the nuclear norm of the softmax attention map; "
                   "MLP: mean over images of the nuclear norm of the MLP output [N, C]",
    }
    return {"target_bits": target, "candidate_bits": cand, "bits": bits, "program_bits": ilp_bits,
            "check": check,
            "sensitivity": opts["mp_sensitivity"],
            "sensitivity_nuclear_norm": {g["name"]: s for g, s in zip(groups, sigma)},
            "nuclear_norm_qk_or_output": {g["name"]: s for g, s in zip(groups, raw_qk)},
            "nuclear_norm_softmax_or_output": {g["name"]: s for g, s in zip(groups, raw_softmax)},
            "output_error": {g["name"]: dict(zip(map(str, cand), row)) for g, row in zip(groups, errors)},
            "omega": {g["name"]: dict(zip(map(str, cand), row)) for g, row in zip(groups, omega)},
            "module_weights": {g["name"]: n for g, n in zip(groups, sizes)},
            "fixed_layers": {la.name: la.b_quant.bits for la in fixed},
            "average_weight_bits": total_bits / total_n,
            "model_size_mb": total_bits / 8 / 1e6,
            "budget_size_mb": target * total_n / 8 / 1e6,
            "solver": "scipy.optimize.milp (0/1 program, exact)",
            "activations": "each module's linear and matmul inputs use its bit width too",
            "sigma_definition": sigma_defs[opts["mp_sensitivity"]],
            "omega_definition": "sigma * mean over images of ||Y_hat - Y||^2 of the module output on float inputs, "
                                "after a reduced search (mp_candidates, mp_rounds, no bias correction) at that "
                                "bit width with only that module quantized"}


class _only_quantizing:
    """Inside, only the quantizers of the given layers act; every other quantizer passes through."""

    def __init__(self, model: nn.Module, layers: list[Layer]):
        keep = {id(q) for la in layers for q in (la.a_quant, la.b_quant)}
        self.qs = [q for q in quantizers_of(model).values() if id(q) not in keep]

    def __enter__(self):
        self.saved = [q.observer for q in self.qs]
        for q in self.qs:
            q.observer = _PassThrough()

    def __exit__(self, *exc):
        for q, o in zip(self.qs, self.saved):
            q.observer = o
        return False


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


@register_method("ptqvit", "PTQ-ViT (Liu et al. 2021): per-layer Pearson/ranking-aware search of signed per-tensor "
                 "intervals, output bias correction, optional nuclear-norm mixed precision (--mixed-precision)",
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
        _swap_layer_quantizers(la, softmax_signed=opts["softmax_signed"], weight_granularity=opts["weight_granularity"])
    if opts["mixed_precision"] is not None:
        t1 = time.perf_counter()
        info["mixed_precision"] = _allocate(model, calib, layers, opts, opts["mixed_precision"])
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
                      + ("" if opts["softmax_signed"] else " (softmax output unsigned)"),
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


def weight_bits_summary(model: nn.Module) -> dict:
    """Average weight bits and size (MB, 10^6 bytes) of the quantized weights of a model."""
    total_bits = total_n = 0
    for m in model.modules():
        if isinstance(m, _QWeighted) and isinstance(m.weight_quant, Quantizer):
            total_bits += m.weight.numel() * m.weight_quant.bits
            total_n += m.weight.numel()
    return {"average_weight_bits": total_bits / max(total_n, 1), "model_size_mb": total_bits / 8 / 1e6,
            "weights": total_n}
