"""Weight rounding after calibration: nearest (the quantizers as calibrated) or GPTQ (OPTQ, Frantar et al.).

GPTQ keeps each weight quantizer's grid (scales and zero points, from whatever method calibrated it, per
channel or per tensor) and chooses the integer codes: per layer, with the layer's calibration inputs ``X``
(rows = tokens, as the layer sees them: after its own input quantizer, with every earlier layer already
quantized and rounded), the Hessian of the output error is ``H = 2 XᵀX / n``. Columns are rounded one after
the other and the rounding error of each is spread over the not yet rounded columns with the rows of the
upper Cholesky factor of the damped inverse Hessian (``H + damp · mean(diag H) · I``); with ``act_order`` the
columns go in order of decreasing ``diag H``; ``block_size`` columns are updated together (lazy batch
updates; the result does not depend on it up to round-off).

The rounded weights are written *into* each layer's weight, exactly on its quantizer's grid, so
``weight_quant(weight) == weight`` bit for bit and a saved state reloads the same model; the layer's weight bias
correction (if a method turned it on) is switched off, since it would move the weights off the grid.

Layers are processed in the order the data flows: the stem (a ViT's patch embedding, a CNN's first
convolution; a Conv2d as a linear layer on its unfolded patches, TF-'SAME' padding included), every unit of
:class:`vitq.models.trunk.Trunk` (transformer blocks, Swin patch merging, CNN blocks) and the head.
A grouped or depthwise convolution is one GPTQ problem per group, with its own Hessian over its input
channels' patches (a depthwise 3×3 has a 9×9 Hessian per channel), solved for all groups at once.
Works in both regimes and for any method.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import as_calib
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.quant.modules import QConv2d, QLinear, QWeighted
from vitq.quant.uniform import UniformQuantizer
from vitq.refine.recon_pieces import weighted_stages

ROUNDINGS = {
    "nearest": "each weight to the nearest level of its quantizer (what the calibration method set)",
    "gptq": "GPTQ/OPTQ: column-by-column rounding with Hessian-based error compensation, inputs from the "
            "already-quantized earlier layers; weights written on the grid (reload exactly)",
}
GPTQ_DEFAULTS = {"damp": 0.01, "act_order": True, "block_size": 128}
# attribute (not saved) GPTQ leaves on each layer it rounds: the compensated weight just before each column was
# rounded, which recon can take as AdaRound's continuous start (``--recon-start gptq``)
CONTINUOUS = "gptq_continuous"


def grid_quant(q: UniformQuantizer, groups: int | None = None):
    """A function rounding a weight column ([out] or [out, k]) to ``q``'s grid (per output row or per tensor).
    With ``groups``: a column [groups, out/groups] of a grouped convolution (output channels group-major)."""
    if not isinstance(q, UniformQuantizer) or q.channel_axis not in (None, 0):
        raise VitqError(f"GPTQ needs a uniform weight quantizer per output channel or per tensor (got {q})")
    s = q.scale.double()
    z = q.zero_point.double()
    if groups is not None:
        if q.channel_axis == 0:
            s, z = s.reshape(groups, -1), z.reshape(groups, -1)
        return lambda col: (torch.clamp(torch.round(col / s) + z, q.qmin, q.qmax) - z) * s
    if q.channel_axis == 0:
        s, z = s[:, None], z[:, None]

    def fn(w: torch.Tensor) -> torch.Tensor:
        col = w.dim() == 1
        w2 = w[:, None] if col else w
        out = (torch.clamp(torch.round(w2 / s) + z, q.qmin, q.qmax) - z) * s
        return out[:, 0] if col else out

    return fn


def gptq_rows(w: torch.Tensor, h: torch.Tensor, quant, damp: float = 0.01, act_order: bool = True,
              block_size: int = 128, continuous: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ on a weight matrix ``w`` [out, in] with Hessian ``h`` [in, in]; ``quant`` rounds a column [out]
    to the grid. Returns the rounded matrix (float64, on the grid up to float64 round-off). ``continuous``
    ([out, in], optional) receives each column as compensated just before its rounding."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = quant(col)
            q[:, i1 + i] = qc
            if continuous is not None:
                continuous[:, i1 + i if perm is None else perm[i1 + i]] = col
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


def _layer_rows(layer: QWeighted, x: torch.Tensor) -> torch.Tensor:
    """The layer's quantized input as rows matching the columns of its weight matrix; for a grouped
    convolution [rows, groups, columns of one group] (group g's columns are its input channels' patches)."""
    if isinstance(layer, QConv2d):
        cols = F.unfold(x, layer.weight.shape[2:], dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [B, C*k*k, L], channel-major
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if layer.groups != 1:
            return rows.reshape(rows.shape[0], layer.groups, -1)
        return rows
    return x.reshape(-1, x.shape[-1])


def _padded(layer: QWeighted, x: torch.Tensor) -> torch.Tensor:
    """The input as the layer's convolution sees it: a TF-'SAME' convolution (a QConv2d that keeps timm's
    ``kernel_size`` and pads in its forward) pads its quantized input exactly as timm does."""
    if isinstance(layer, QConv2d) and hasattr(layer, "kernel_size"):
        from timm.layers.padding import pad_same

        return pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    return x


def gptq_groups(w: torch.Tensor, h: torch.Tensor, quant, damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """GPTQ on ``groups`` independent problems at once (a grouped or depthwise convolution): ``w`` [groups,
    rows, cols] and one Hessian per group ``h`` [groups, cols, cols] (a depthwise 3×3 has a 9×9 one per
    channel); ``quant`` rounds a column [groups, rows] to the grid. Same algorithm as :func:`gptq_rows`
    (without lazy blocks: a group has few columns). Returns the rounded weights (float64)."""
    w = w.double().clone()
    h = h.double().clone()
    g, _, cols = w.shape
    eye = torch.eye(cols, dtype=h.dtype, device=h.device)
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    h = h + torch.diag_embed(dead.to(h.dtype))
    diag = torch.diagonal(h, dim1=1, dim2=2)
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True, stable=True)  # [g, cols]
        w = torch.gather(w, 2, perm[:, None, :].expand_as(w))
        h = torch.gather(h, 1, perm[:, :, None].expand_as(h))
        h = torch.gather(h, 2, perm[:, None, :].expand_as(h))
    h = h + damp * torch.diagonal(h, dim1=1, dim2=2).mean(1)[:, None, None] * eye
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    q = torch.zeros_like(w)
    for i in range(cols):
        col = w[:, :, i]
        qc = quant(col)
        q[:, :, i] = qc
        e = (col - qc) / u[:, i, i][:, None]
        w[:, :, i:] -= e[:, :, None] * u[:, i, i:][:, None, :]
    if perm is not None:
        q = torch.gather(q, 2, torch.argsort(perm, dim=1)[:, None, :].expand_as(q))
    return q


@torch.no_grad()
def _hessian(layer: QWeighted, run, inputs, chunk: int = 4) -> tuple[torch.Tensor, int]:
    """``2 XᵀX / n`` over the calibration inputs (per group [groups, cols, cols] for a grouped conv),
    accumulated a few images at a time (an unfolded feature map is large)."""
    acc = {"h": None, "n": 0}

    def hook(_mod, _args, out):
        x = _padded(layer, out.detach())
        for i in range(0, x.shape[0], chunk):
            rows = _layer_rows(layer, x[i:i + chunk]).double()
            h = torch.einsum("ngi,ngj->gij", rows, rows) if rows.dim() == 3 else rows.t() @ rows
            acc["h"] = h if acc["h"] is None else acc["h"] + h
            acc["n"] += rows.shape[0]

    handle = layer.input_quant.register_forward_hook(hook)
    try:
        for x in inputs:
            run(x)
    finally:
        handle.remove()
    if acc["h"] is None:
        return None, 0
    return 2.0 * acc["h"] / acc["n"], acc["n"]


@torch.no_grad()
def gptq_layer(layer: QWeighted, h: torch.Tensor, damp: float, act_order: bool, block_size: int) -> dict:
    """Round one layer's weight with GPTQ and write it back on the grid. Returns its proxy errors."""
    wq = layer.weight_quant
    if not bool(wq.initialized):
        raise VitqError("GPTQ needs calibrated weight quantizers (run a --method first)")
    w = layer.weight.detach()
    w2 = w.reshape(w.shape[0], -1).double()
    quant = grid_quant(wq)
    nearest = quant(w2)
    groups = getattr(layer, "groups", 1)
    pre = None  # the compensated weights before rounding (grouped convolutions: not kept)
    if groups == 1:
        pre = torch.empty_like(w2)
        q = gptq_rows(w2, h, quant, damp=damp, act_order=act_order, block_size=block_size, continuous=pre)
    else:  # one problem per group: rows = its output channels, columns = its input channels' patches
        grid = grid_quant(wq, groups)
        q = gptq_groups(w2.reshape(groups, -1, w2.shape[1]), h, grid, damp=damp, act_order=act_order)
        q = q.reshape(w2.shape)
    new = wq.fake_quant(q.to(w.dtype).reshape(w.shape))  # exactly on the float32 grid
    if not torch.equal(wq.fake_quant(new), new):
        raise VitqError("GPTQ: rounded weights are not a fixed point of the weight quantizer")

    def err(m):
        d = m - w2
        if groups != 1:
            d = d.reshape(groups, -1, d.shape[1])
            return float(torch.einsum("goi,gij,goj->", d, h, d))
        return float(torch.einsum("oi,ij,oj->", d, h, d))

    corrected = bool(layer.weight_correction)
    layer.weight.copy_(new)
    if pre is not None:
        setattr(layer, CONTINUOUS, pre.to(w.dtype).reshape(w.shape))
    layer.weight_correction.fill_(False)
    return {"proxy_error_nearest": err(nearest), "proxy_error_gptq": err(new.reshape(w2.shape).double()),
            "bias_correction_turned_off": corrected}


@torch.no_grad()
def round_weights(qmodel: nn.Module, calib, how: str = "gptq", damp: float = GPTQ_DEFAULTS["damp"],
                  act_order: bool = GPTQ_DEFAULTS["act_order"], block_size: int = GPTQ_DEFAULTS["block_size"],
                  batch_size: int = 50, device="cpu", seed: int = 0, progress: bool = True) -> dict:
    """Round the weights of a calibrated model: ``how="nearest"`` keeps them (the quantizers' own rounding),
    ``how="gptq"`` runs GPTQ on every weighted layer in data-flow order. ``calib``: images [N, C, H, W] or a
    CalibData. Returns a dict for results.json."""
    if how not in ROUNDINGS:
        raise VitqError(f"--weight-rounding {how!r} is not supported (expected one of {', '.join(ROUNDINGS)})")
    if how == "nearest":
        return {"weight_rounding": "nearest"}
    if not damp >= 0:
        raise VitqError(f"GPTQ damp={damp!r} (expected a number >= 0)")
    if not isinstance(block_size, int) or block_size < 1:
        raise VitqError(f"GPTQ block_size={block_size!r} (expected a positive integer)")
    calib = as_calib(calib, batch_size, device, seed, progress)
    qmodel.to(calib.device).eval()
    trunk = Trunk(qmodel)
    t0 = time.perf_counter()
    inputs = list(calib.batches())
    done: set[int] = set()
    layers_info = {}
    names = {id(m): n for n, m in qmodel.named_modules()}
    stages = weighted_stages(qmodel, trunk, inputs[0])
    bar = calib.bar(range(sum(1 for m in qmodel.modules() if isinstance(m, (QLinear, QConv2d)))), "gptq")
    it = iter(bar)
    for si, (_stage, stage_layers, run) in enumerate(stages):
        if stage_layers:
            for layer in stage_layers:
                if id(layer) in done:
                    continue
                done.add(id(layer))
                next(it, None)
                h, n = _hessian(layer, run, inputs)
                name = names[id(layer)]
                if h is None:
                    layers_info[name] = {"skipped": "no calibration input reached it"}
                    continue
                layers_info[name] = {"rows": n, **gptq_layer(layer, h, damp, act_order, block_size)}
        if si < len(stages) - 1:
            inputs = [run(x) for x in inputs]
    for _ in it:
        pass
    ratio = [v["proxy_error_gptq"] / max(v["proxy_error_nearest"], 1e-30) for v in layers_info.values()
             if "proxy_error_gptq" in v]
    return {"weight_rounding": "gptq", "gptq": {"damp": damp, "act_order": act_order, "block_size": block_size,
                                                "num_calib": len(calib), "layers_rounded": len(ratio),
                                                "mean_proxy_error_ratio": sum(ratio) / max(len(ratio), 1),
                                                "layers": layers_info},
            "seconds": time.perf_counter() - t0}
