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

Here: the options and the orchestration. The operands are recorded by :mod:`vitq.methods.layerwise`, one layer's
search is :mod:`vitq.methods.ptqvit_problem`, mixed precision :mod:`vitq.methods.ptqvit_mp`, the options
:mod:`vitq.methods.ptqvit_options`.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.methods.baselines import calibrate_observed
from vitq.methods.layerwise import Layer, find_layers, image_chunks, record, run_segment, segments
from vitq.methods.ptqvit_mp import allocate
from vitq.methods.ptqvit_options import PtqvitOptions
from vitq.methods.ptqvit_problem import check_searchable, problem_of, swap_layer_quantizers, write_result
from vitq.quant.base import passthrough
from vitq.registry import register_method


@torch.no_grad()
def _calibrate_all(model: nn.Module, calib: CalibData, layers: list[Layer], cfg: PtqvitOptions) -> list[dict]:
    """The layer-by-layer search over the whole model (both calibration orders)."""
    gen = torch.Generator().manual_seed(calib.seed)
    pairs_gen = torch.Generator().manual_seed(calib.seed + 1)
    sequential = cfg.calibration == "sequential"
    h_f = image_chunks(calib, cfg.images)
    h_q = h_f
    trace = []
    segs = segments(model, layers, h_f[0])
    for seg_name, fn, seg_layers in calib.bar(segs, "ptqvit", len(segs)):
        with passthrough(model):
            h_f_next = record(fn, h_f, seg_layers, "float", gen, tokens=cfg.tokens, rows=cfg.rows, stop=False)
        for layer in seg_layers:
            tag = "float"
            if sequential:
                record(fn, h_q, [layer], "quant", gen, tokens=cfg.tokens, rows=cfg.rows, stop=True,
                       keep_output=False)
                tag = "quant"
            prob = problem_of(layer, tag, cfg, pairs_gen)
            res = prob.search(cfg.candidates, cfg.rounds, cfg.bias_corr)
            write_result(layer, res)
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
            h_q = run_segment(fn, h_q)
        h_f = h_f_next
        if not sequential:
            h_q = h_f
    return trace


# ---------------------------------------------------------------------------------------------------------------
# registration

def _adjust_scheme(scheme, cfg: PtqvitOptions):
    return dataclasses.replace(scheme, weight_signed=True, softmax_quantizer=None)


@register_method("ptqvit", "PTQ-ViT (Liu et al. 2021): per-layer Pearson/ranking-aware search of per-tensor "
                 "input and per-channel weight intervals, output bias correction, optional nuclear-norm mixed "
                 "precision (--mixed-precision)",
                 config=PtqvitOptions, adjust_scheme=_adjust_scheme,
                 quick_options={"candidates": 8, "rounds": 1, "images": 16, "tokens": 16, "rows": 16, "pairs": 64},
                 expected_time="DeiT-Tiny, 16 images: 5-7 s on 2 CPU cores with 20 candidates, 3 rounds, 16 tokens "
                               "and rows, 128 pairs; mixed precision ~14 s (BENCHMARKS.md ptqvit); at the defaults "
                               "on all images not measured; GPU not measured")
def ptqvit(model: nn.Module, calib: CalibData, cfg: PtqvitOptions) -> dict:
    scheme = getattr(model, "vitq_scheme", None)
    fq = bool(scheme is not None and scheme.fully_quantized)
    info: dict = {}
    t0 = time.perf_counter()
    layers = find_layers(model)
    check_searchable(layers)  # before any work
    if fq:
        calibrate_observed(model, calib, cfg.fq_init, "minmax")
        info["fq_only_quantizers"] = (f"scores, LayerNorm-input and residual (PTF) quantizers: observer-based "
                                      f"{cfg.fq_init} over all calibration images (not searched)")
    for la in layers:
        swap_layer_quantizers(la, softmax_signed=cfg.softmax_signed, weight_granularity=cfg.weight_granularity,
                              input_grid=cfg.input_grid)
    if cfg.mixed_precision is not None:
        t1 = time.perf_counter()
        info["mixed_precision"] = allocate(model, calib, layers, cfg, cfg.mixed_precision)
        info["mixed_precision"]["seconds"] = time.perf_counter() - t1
    layers = find_layers(model)
    t2 = time.perf_counter()
    trace = _calibrate_all(model, calib, layers, cfg)
    n_images = len(calib) if cfg.images is None else min(cfg.images, len(calib))
    inits = [t["init_objective"] for t in trace]
    finals = [t["objective"] for t in trace]
    info.update({
        "regime": scheme.name if scheme is not None else None,
        "calibration_inputs": ("sequential: each layer's inputs come from the already-quantized earlier layers"
                               if cfg.calibration == "sequential"
                               else "parallel: each layer's inputs come from the float model"),
        "weight_granularity": cfg.weight_granularity,
        "quantizers": ("signed symmetric per-tensor for every searched weight and input"
                       if cfg.weight_granularity == "tensor" else
                       "signed symmetric: per output channel for the weights of linear layers, per tensor for every "
                       "searched input (and q, k, softmax output, v)")
                      + ("" if cfg.softmax_signed else " (softmax output unsigned)")
                      + ("" if cfg.input_grid == "symmetric" else
                         " (linear-layer inputs unsigned with a zero point: asymmetric per tensor)"),
        "weight_search": ("one interval per weight tensor on the grid [low, high] x max|W| / qmax"
                          if cfg.weight_granularity == "tensor" else
                          "per output channel c, intervals f * max|W_c| / qmax with one f shared by all channels on "
                          "the grid [low, high], chosen by the layer objective"
                          if cfg.channel_search == "shared" else
                          "per output channel c, intervals f * max|W_c| / qmax with f on the grid [low, high]: each "
                          "step keeps the better (by the layer objective) of one shared f, and each channel's own f "
                          "by its output error (variance of the error with bias correction, else MSE)"),
        "search_images": n_images,
        "objective": "mean per-sample Pearson correlation of float and quantized layer outputs; "
                     "QK^T: minus gamma * ranking loss" if cfg.ranking else
                     "mean per-sample Pearson correlation of float and quantized layer outputs",
        "ranking_pairs": ("per QK^T layer, `pairs` random pairs i<j of key positions drawn once (seeded) and shared "
                          "by every sampled query row, head and image; hinge mean over pairs, rows, images; sum "
                          "over heads"),
        "subsampling": (f"{cfg.tokens} random token positions per sample for linear layers, {cfg.rows} "
                        "random query rows per sample and head for the attention matmuls (same positions for "
                        "every sample of a layer); interval init from the max over full tensors"),
        "mean_init_objective": sum(inits) / max(len(inits), 1),
        "mean_objective": sum(finals) / max(len(finals), 1),
        "search_seconds": time.perf_counter() - t2,
        "layers": trace,
    })
    info["total_seconds_inner"] = time.perf_counter() - t0
    return info
