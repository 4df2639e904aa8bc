"""PSAQ-ViT (patch similarity aware data-free quantization, Li et al. 2022, v1) for vision transformers.

A transformer has no BatchNorm statistics to match, but its self-attention says something about real images:
on a real image the patches of one picture are alike in many different degrees (sky with sky, edge with edge),
so the cosine similarities between the tokens that enter a self-attention layer spread over a wide range; on
noise they crowd near one value. The generator makes that spread large: for every attention input (the input
of each ``qkv`` / ``query`` / ``q_proj`` projection, [B, tokens, C]; Swin's windows count as images of their own) it
estimates the differential entropy of the pairwise token similarities with a Gaussian kernel density estimate
on a seeded sample of pairs, and maximises it, with a cross-entropy toward a target class per image (v1's
class prior). v2's teacher-student loop trains the quantized model on the images it makes (fine-tuning, not
calibration), so it is not part of this calibration-only generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vitq.options import opt
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


@dataclass(frozen=True)
class PsaqOptions(LoopOptions):
    entropy_weight: float = opt(1.0, "weight of the patch-similarity entropy (maximised)", minimum=0)
    pairs: int = opt(256, "token pairs per image and layer in the kernel density estimate", minimum=8)
    tv_weight: float = opt(0.05, "weight of the total-variation smoothness prior", minimum=0)


def attention_inputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose input is a self-attention input: each attention's qkv (or query, q_proj) projection."""
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ATTENTION_INPUTS]


def psaq_unfit(model: nn.Module) -> str | None:
    if attention_inputs(model):
        return None
    return (f"--synthetic-generator psaq reads the inputs of self-attention layers, and {model_name(model)} has "
            "none (no qkv/query/q_proj projection); for CNNs with BatchNorm use bn (data-free) or fdda (with real "
            "images)")


def similarity_entropy(tokens: torch.Tensor, pairs: int, gen: torch.Generator) -> torch.Tensor:
    """Mean over images of the differential entropy of the cosine similarities between the tokens of each image
    ([B, N, C]): a Gaussian kernel density estimate (Scott's bandwidth) evaluated on ``pairs`` seeded pairs."""
    if tokens.dim() != 3 or tokens.shape[1] < 3:
        return tokens.new_zeros(())
    t = nn.functional.normalize(tokens.float(), dim=-1)
    b, n, _ = t.shape
    i = torch.randint(0, n, (pairs,), generator=gen)
    j = (i + torch.randint(1, n, (pairs,), generator=gen)) % n  # never a token with itself
    i, j = i.to(t.device), j.to(t.device)
    sims = (t[:, i] * t[:, j]).sum(-1)  # [B, pairs]
    h = 1.06 * sims.detach().std(1, keepdim=True).clamp_min(1e-3) * pairs ** (-0.2)
    z = (sims.unsqueeze(2) - sims.unsqueeze(1)) / h.unsqueeze(2)  # [B, pairs, pairs]
    density = torch.exp(-0.5 * z * z).mean(2) / (h * math.sqrt(2 * math.pi))
    return -(density.clamp_min(1e-12).log()).mean()


@register_generator("psaq", PsaqOptions, "vision transformers: maximise the entropy of patch similarities at "
                    "every self-attention input (PSAQ-ViT v1)", psaq_unfit)
def generate_psaq(model: nn.Module, req: Request, cfg: PsaqOptions) -> Generated:
    layers = [m for _, m in attention_inputs(model)]
    labels = target_classes(req, torch.Generator().manual_seed(req.seed))
    with InputHooks(layers) as hooks:
        def loss_fn(x, logits, y, gen, start):
            ents = [similarity_entropy(a, cfg.pairs, gen) for a in hooks.inputs if a is not None]
            entropy = torch.stack(ents).mean()
            return -cfg.entropy_weight * entropy, {"entropy": entropy.item()}
        out = optimise(model, req, cfg, loss_fn, labels, "synthesize (psaq)")
    out.info["attention_layers"] = len(layers)
    return out
