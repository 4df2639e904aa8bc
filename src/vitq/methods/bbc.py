"""APQ-ViT's Bottom-elimination Blockwise Calibration (BBC): block by block, every quantizer of a transformer
block is searched again against the squared-gradient-weighted error of the block's output, the smallest
errors dropped (bottom elimination). The method, its options and their reading are in
:mod:`vitq.methods.apq`; the float pass with gradients and the knobs are :mod:`vitq.methods.hessian`'s.

Blocks are found through :class:`~vitq.quant.modules.QTransformerBlock`. A block whose forward is the plain
pre-norm sequence (``sequential``, e.g. timm ViT's) is split into pieces so that a search reuses what the
quantizers it moves do not change and evaluates only sampled query rows; any other transformer block (e.g.
Swin's, whose windows reshape the tokens inside the block) is searched as a whole on all rows. A unit of the
trunk that is no transformer block is refused by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.methods.hessian import Capture, Grids, Knob, make_knob, search_knobs
from vitq.models.family import family_of
from vitq.models.trunk import Trunk
from vitq.quant.base import passthrough
from vitq.quant.modules import QTransformerBlock

# -- the bottom-elimination metric -----------------------------------------------------------------------------


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


# -- blocks and their pieces -----------------------------------------------------------------------------------


def bbc_blocks(model: nn.Module) -> list[str]:
    """Names of the trunk's blocks BBC searches, in order; a block that is no transformer block is refused."""
    names = []
    for _, name, block in Trunk(model).blocks():
        if not isinstance(block, QTransformerBlock):
            raise VitqError(f"apq: block {name} ({type(block).__name__}) is not a transformer block "
                            "(QTransformerBlock), so BBC has nothing to search it with; use --apq-no-bbc")
        if not isinstance(getattr(block.attn, "qkv", None), nn.Module):  # e.g. separate q/k/v projections
            raise VitqError(f"apq: block {name}'s attention ({type(block.attn).__name__}, family "
                            f"{family_of(model).name}) has no fused qkv projection, which BBC searches with the "
                            "attention output; use --apq-no-bbc")
        names.append(name)
    return names


class BlockPieces:
    """A sequential :class:`QTransformerBlock` split at the points where a search over its quantizers can
    reuse earlier results, evaluated only at the query-token rows ``idx`` (keys/values use all tokens,
    everything after the attention is per token). ``full(x, idx)`` equals ``block(x)[:, idx]``."""

    def __init__(self, block: nn.Module, name: str = "block"):
        if not (isinstance(block, QTransformerBlock) and block.sequential):
            raise VitqError(f"{name} ({type(block).__name__}) is not a sequential transformer block "
                            "(QTransformerBlock with sequential=True): it cannot be split into pieces")
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
        scores = (q * a.scale) @ k.transpose(-2, -1)
        bias = a.score_bias()
        if bias is not None:
            scores = scores + bias[:, :, idx]
        p = a.softmax_quant(a.score_quant(scores).softmax(dim=-1))
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


# -- the search --------------------------------------------------------------------------------------------------


@torch.no_grad()
def bbc_block(block: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor, g2: torch.Tensor,
              grids: Grids, cfg, gen: torch.Generator) -> dict:
    """BBC of one block on its input ``x`` against ``target`` (``cfg``: the apq options)."""
    keep = float(cfg.keep_fraction)
    stages = block_knob_stages(block, name, grids)
    knobs = [kb for s in stages for kb in s]
    start = [kb.snapshot() for kb in knobs]

    def whole() -> float:  # the guard's metric: every token row, every element, nothing eliminated
        return float(bbc_distance(target, block(x), g2, 1.0))

    whole_before = whole() if cfg.bbc_guard else None
    if block.sequential:
        pieces = BlockPieces(block, name)
        n = x.shape[1]
        frac = cfg.bbc_token_fraction if cfg.bbc_token_fraction is not None else cfg.token_fraction
        k = max(1, int(round(float(frac) * n)))
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(x.device)
        t, w = target[:, idx], g2[:, idx]

        def metric(oh):
            return bbc_distance(t, oh, w, keep)

        before = float(metric(pieces.full(x, idx)))
        for _ in range(cfg.bbc_rounds):
            search_knobs(stages[0], lambda: pieces.full(x, idx), metric, 1)
            qkv = pieces.qkv(x)
            search_knobs(stages[1], lambda qkv=qkv: pieces.mlp(pieces.project(x, pieces.attend(qkv, idx), idx)),
                         metric, 1)
            att = pieces.attend(qkv, idx)
            search_knobs(stages[2], lambda att=att: pieces.mlp(pieces.project(x, att, idx)), metric, 1)
            y = pieces.project(x, att, idx)
            search_knobs(stages[3], lambda y=y: pieces.mlp(y), metric, 1)
        after = float(metric(pieces.full(x, idx)))
        rows = f"{k} of {n} query tokens"
    else:  # e.g. a Swin block: whole block, all rows

        def metric(oh):
            return bbc_distance(target, oh, g2, keep)

        before = float(metric(block(x)))
        for _ in range(cfg.bbc_rounds):
            search_knobs(knobs, lambda: block(x), metric, 1)
        after = float(metric(block(x)))
        rows = "all tokens"
    out = {"bbc_distance_ratio": after / before if before > 0 else 1.0, "rows": rows}
    if cfg.bbc_guard:
        whole_after = whole()
        kept = whole_after <= whole_before
        if not kept:  # the eliminated/sampled metric improved but the block's whole error got worse: undo
            for kb, st in zip(knobs, start, strict=True):
                kb.apply_state(st)
        out["guard"] = {"whole_error_ratio": whole_after / whole_before if whole_before > 0 else 1.0,
                        "kept": kept}
    out["choices"] = {kb.name[len(name) + 1:]: kb.describe() for kb in knobs}
    return out


@torch.no_grad()
def bbc_search(model: nn.Module, cap: Capture, images: torch.Tensor, grids: Grids, cfg, device, seed: int,
               bar=lambda it, **kw: it) -> dict:
    """BBC over every transformer block in order (see :mod:`vitq.methods.apq`); ``cfg``: the apq options."""
    trunk = Trunk(model)
    blocks = set(bbc_blocks(model))
    gen = torch.Generator().manual_seed(seed + 1)
    quantized_inputs = cfg.bbc_inputs == "quantized"
    h = trunk.stem(images.to(device)) if quantized_inputs else None
    trace = {}
    for uname, unit in bar(trunk.units, desc="BBC blocks", total=len(trunk.units)):
        if uname in blocks:
            d = cap.blocks[uname]
            x = h if quantized_inputs else d["x"].to(device)
            if quantized_inputs and cfg.bbc_target == "same_input":
                with passthrough(unit):  # the float block on the same (quantized) input: only this block's error
                    target = unit(x)
            else:
                target = d["o"].to(device)
            trace[uname] = bbc_block(unit, uname, x, target, d["g2"].to(device), grids, cfg, gen)
        if quantized_inputs:
            h = unit(h)
    return trace
