"""PTQ-ViT's per-layer search problem (:mod:`vitq.methods.ptqvit`, METHODS.md §3): the objective pieces
(:func:`sym_quant`, :func:`pearson`, :func:`ranking_loss`, :func:`sample_pairs`), the search of one layer's two
intervals on its cached operands (:class:`LayerProblem`), and the quantizers it searches and writes
(:func:`swap_layer_quantizers`, :func:`write_result`, :func:`problem_of`).
"""

from __future__ import annotations

import torch

from vitq.errors import VitqError
from vitq.methods.layerwise import Layer, weight_matrix
from vitq.methods.ptqvit_options import PtqvitOptions
from vitq.quant.base import EPS, int_range
from vitq.quant.uniform import UniformQuantizer

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
# the per-layer problem

class LayerProblem:
    """Cached operands of one layer and the objective of a pair of intervals (Δ_A, Δ_B)."""

    def __init__(self, layer: Layer, A: torch.Tensor, B: torch.Tensor, A_float: torch.Tensor,
                 B_float: torch.Tensor, a_bits: int, b_bits: int, amax_a: float, amax_b: float, cfg: PtqvitOptions,
                 pairs: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None,
                 attn_scale: float = 1.0, a_signed: bool = True, b_signed: bool = True,
                 a_range: tuple[float, float] | None = None):
        self.layer, self.kind = layer, layer.kind
        self.a_signed, self.b_signed = a_signed, b_signed
        self.A, self.B = A, B
        self.a_bits, self.b_bits = a_bits, b_bits
        self.cfg = cfg
        self.attn_scale = attn_scale
        self.bias0 = None if bias is None else bias.detach().float().clone()
        self.bias = None if bias is None else self.bias0.clone()
        self.pairs = pairs if (self.kind == "qk" and cfg.ranking) else None
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
            obj = obj - self.cfg.gamma * ranking_loss(out_hat, self.target4, *self.pairs, self.cfg.theta)
        return obj

    def evaluate(self, side: str, scales: torch.Tensor, fixed, channel_error: str | None = None):
        """Objective for each candidate interval of ``side`` ('A' or 'B') with the other side at ``fixed``.

        With ``channel_error`` ('mse', or 'var' = the error's variance, i.e. what is left after the output bias
        correction removes its mean), also returns that error per candidate and output channel [C, out]."""
        per = max(self.target.numel(), (self.A if side == "A" else self.B).numel())
        chunk = max(1, self.cfg.chunk_elements // max(per, 1))
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
        if self.cfg.channel_search == "shared":
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
        cfg = self.cfg
        grid_a = torch.linspace(cfg.low * self.a0, cfg.high * self.a0, candidates)
        if self.b_channel:
            factors = torch.linspace(cfg.low, cfg.high, candidates, device=self.b0.device)
            grid_b = factors[:, None] * self.b0[None, :]  # [C, out]: candidate factors of each channel's Δ₀
        else:
            grid_b = torch.linspace(cfg.low * self.b0, cfg.high * self.b0, candidates)
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
                changed |= not same_interval(new_b, b)
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


def same_interval(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
    return x == y


# ---------------------------------------------------------------------------------------------------------------
# the quantizers of a layer

def check_searchable(layers: list[Layer]) -> None:
    """Refuse a layer quantizer of a kind other than uniform (the search sets uniform grids), naming it."""
    for layer in layers:
        for parent, attr in (layer.a_attr, layer.b_attr):
            q = getattr(parent, attr)
            if type(q) is not UniformQuantizer:
                raise VitqError(f"ptqvit: quantizer {layer.quantizer_name(attr)} is of kind "
                                f"{getattr(q, 'kind', type(q).__name__)!r} (expected 'uniform': the search sets "
                                "uniform grids; prepare the model with method='ptqvit' and no softmax or GELU "
                                "quantizer kind)")


def swap_layer_quantizers(layer: Layer, a_bits: int | None = None, b_bits: int | None = None,
                          softmax_signed: bool = True, weight_granularity: str = "tensor",
                          input_grid: str = "symmetric") -> None:
    """Give a layer the quantizers PTQ-ViT searches (bits kept unless given): signed symmetric per tensor, except
    the weight of a linear layer when ``weight_granularity`` is 'channel' (one Δ per output channel). The softmax
    output is unsigned with zero point 0 when ``softmax_signed`` is False; a linear layer's input is unsigned with
    a zero point (set by the search) when ``input_grid`` is 'asymmetric'.

    Replacing is the purpose (the method's quantizer form, and the bit widths of mixed precision): each quantizer
    must be a uniform one, whose grid only changes; any other kind is refused, naming the quantizer. A per-head
    q/k/v grid (``attn_granularity='head'``) becomes one per tensor, the paper's form."""
    check_searchable([layer])
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


def write_result(layer: Layer, res: dict) -> None:
    """Write a search result into the layer: both intervals, the A zero point, and the corrected bias."""
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


def problem_of(layer: Layer, tag_input: str, cfg: PtqvitOptions, pairs_gen: torch.Generator) -> LayerProblem:
    """The search problem of a layer from its cache: inputs recorded under ``tag_input``, targets from the float
    record; the ranking pairs of a QKᵀ layer are drawn once per layer."""
    fl = layer.cache["float"]
    cur = layer.cache[tag_input]
    if layer.kind == "linear":
        B = weight_matrix(layer.module)
        Bf, amax_b = B, float(B.abs().max())
        bias = layer.module.bias
    else:
        B, Bf, amax_b, bias = cur["B"], fl["B"], cur["amax_B"], None
    pairs = None
    if layer.kind == "qk" and cfg.ranking:
        if "pairs" not in layer.cache:
            layer.cache["pairs"] = sample_pairs(B.shape[-2], cfg.pairs, pairs_gen)
        pairs = layer.cache["pairs"]
    scale = float(layer.module.scale) if layer.kind == "qk" else 1.0
    a_range = (cur["min_A"], cur["max_A"]) if layer.kind == "linear" and not layer.a_quant.signed else None
    return LayerProblem(layer, cur["A"], B, fl["A"], Bf, layer.a_quant.bits, layer.b_quant.bits, cur["amax_A"],
                        amax_b, cfg, pairs, bias, attn_scale=scale, a_signed=layer.a_quant.signed,
                        b_signed=layer.b_quant.signed, a_range=a_range)


