"""PTQ-ViT's mixed precision (METHODS.md §3): one bit width per block MSA and MLP, chosen by an exact integer
program that minimizes Ω = Σ σ·‖Ŷ − Y‖² under the model-size budget, with a check against the uniform allocation
of the same size. The per-layer interval search it runs at each candidate bit width is PTQ-ViT's
(:mod:`vitq.methods.ptqvit_problem`), on operands recorded by :mod:`vitq.methods.layerwise`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.methods.layerwise import Layer, image_chunks, record, run_segment
from vitq.methods.ptqvit_options import PtqvitOptions
from vitq.methods.ptqvit_problem import problem_of, swap_layer_quantizers, write_result
from vitq.models.trunk import Trunk
from vitq.quant.base import Quantizer, passthrough, quantizers_of
from vitq.quant.modules import QWeighted


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
        with passthrough(_others(model, [la for g in groups for la in g["layers"]])):
            out = [model(x) for x in images]
    finally:
        for la, a_q, b_q in saved:
            setattr(*la.a_attr, a_q)
            setattr(*la.b_attr, b_q)
    return _kl_to_float(out, ref)


@torch.no_grad()
def allocate(model: nn.Module, calib: CalibData, layers: list[Layer], cfg: PtqvitOptions, target: int) -> dict:
    """Sensitivity σ (nuclear norms), Ω per module and bit width (from a reduced search on float inputs), the
    exact allocation under the size budget, and the check against the uniform allocation of the same size.

    Check (on unless ``mp_no_check``): the uniform allocation (every module at the target bits) is feasible, so
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
    n_img = cfg.mp_images if cfg.mp_images is not None else cfg.images
    images = image_chunks(calib, n_img)
    with passthrough(model):
        h = run_segment(trunk.stem, images)
    by_block = {id(g["block"]): [] for g in groups}
    for g in groups:
        by_block[id(g["block"])].append(g)
    errors, raw_qk, raw_softmax, variants = [], [], [], []
    for _name, unit in calib.bar(trunk.units, "ptqvit allocation", len(trunk.units)):
        gs = by_block.get(id(unit), [])
        if not gs:
            with passthrough(model):
                h = run_segment(unit, h)
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
            with passthrough(model):
                seg_layers = [la for g in gs for la in g["layers"]]
                h_next = record(unit, h, seg_layers, "float", gen, tokens=cfg.tokens, rows=cfg.rows, stop=False)
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
                    swap_layer_quantizers(la, bits, bits, cfg.softmax_signed, cfg.weight_granularity,
                                          cfg.input_grid)
                for la in g["layers"]:
                    prob = problem_of(la, "float", cfg, pairs_gen)
                    res = prob.search(cfg.mp_candidates, cfg.mp_rounds, bias_corr=False)
                    res["bias"] = None
                    write_result(la, res)
                err = 0.0
                for (args, kwargs), y in zip(xs, ys):
                    with passthrough(_others(model, g["layers"])):
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
    sigma = module_sensitivity(raw_qk, raw_softmax, [g["part"] for g in groups], cfg.mp_sensitivity)
    omega = [[s * e for e in row] for s, row in zip(sigma, errors)]
    choice = solve_allocation(omega, sizes, cand, budget)
    chosen_bits = [cand[k] for k in choice]
    omega_total = sum(omega[m][k] for m, k in enumerate(choice))
    check: dict = {"kl_check": not cfg.mp_no_check, "omega_chosen": omega_total}
    uniform_ok = target in cand and target * sum(sizes) <= budget * (1 + 1e-12)
    fallback = None
    if uniform_ok:
        k_u = cand.index(target)
        check["omega_uniform"] = sum(row[k_u] for row in omega)
        if omega_total > check["omega_uniform"] * (1 + 1e-9):
            fallback = "the program's allocation has a larger sum of Omega than uniform (solver failure)"
        if not cfg.mp_no_check:
            with passthrough(model):
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
            swap_layer_quantizers(la, bits[g["name"]], bits[g["name"]], cfg.softmax_signed, cfg.weight_granularity,
                                  cfg.input_grid)
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
            "sensitivity": cfg.mp_sensitivity,
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
            "sigma_definition": sigma_defs[cfg.mp_sensitivity],
            "omega_definition": "sigma * mean over images of ||Y_hat - Y||^2 of the module output on float inputs, "
                                "after a reduced search (mp_candidates, mp_rounds, no bias correction) at that "
                                "bit width with only that module quantized"}


def _others(model: nn.Module, layers: list[Layer]) -> list[Quantizer]:
    """Every quantizer of the model but those of the given layers (they alone act inside ``passthrough``)."""
    keep = {id(q) for la in layers for q in (la.a_quant, la.b_quant)}
    return [q for q in quantizers_of(model).values() if id(q) not in keep]


def weight_bits_summary(model: nn.Module) -> dict:
    """Average weight bits and size (MB, 10^6 bytes) of the quantized weights of a model."""
    total_bits = total_n = 0
    for m in model.modules():
        if isinstance(m, QWeighted) and isinstance(m.weight_quant, Quantizer):
            total_bits += m.weight.numel() * m.weight_quant.bits
            total_n += m.weight.numel()
    return {"average_weight_bits": total_bits / max(total_n, 1), "model_size_mb": total_bits / 8 / 1e6,
            "weights": total_n}
