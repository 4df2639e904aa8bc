"""Generators for CNNs with BatchNorm: the BatchNorm statistics a model was trained with say what its inputs
look like, layer by layer.

- ``bn`` (ZeroQ-style, Cai et al. 2020): images whose batch statistics (per-channel mean and standard deviation
  of each BatchNorm's input) match the running statistics stored in the layer; no labels by default.
- ``fdda`` (fine-grained data distribution alignment, Zhong et al. 2022): the real calibration images give
  per-class statistics. Shallow layers keep the global match above (low-level features are shared by every
  class); in the deep layers (the last ``deep_fraction`` of the BatchNorms) each synthetic image is pulled toward
  the statistics of its own target class, once toward the class centre itself (the centralized loss) and once
  toward that centre moved by fresh Gaussian noise every step (the distorted loss, which keeps the images of a
  class apart instead of collapsing onto one point). Target classes are the classes the float model predicts
  for the real images (a calibration folder's names are not used as labels), and the synthetic images are
  meant to be used together with the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.options import opt
from vitq.synth.base import (
    Generated,
    InputHooks,
    LoopOptions,
    Request,
    batchnorms,
    no_batchnorm,
    optimise,
    register_generator,
    target_classes,
)


@dataclass(frozen=True)
class BnOptions(LoopOptions):
    ce_weight: float = opt(0.0, "weight of the cross-entropy toward each image's target class (ZeroQ: none)",
                           minimum=0)


@dataclass(frozen=True)
class FddaOptions(LoopOptions):
    deep_fraction: float = opt(0.5, "share of the BatchNorm layers, counted from the output, that get the "
                                    "per-class losses", above=0, maximum=1)
    class_weight: float = opt(1.0, "weight of the centralized and distorted per-class losses", minimum=0)
    noise: float = opt(0.5, "std of the distortion noise, in units of the spread of the real images' statistics",
                       minimum=0)


def batch_stats(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of a BatchNorm input ([B, C, ...], channels on dim 1)."""
    var, mean = torch.var_mean(a, dim=[d for d in range(a.dim()) if d != 1], unbiased=False)
    return mean, (var + 1e-5).sqrt()


def image_stats(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation of a [B, C, H, W] batch: two [B, C] tensors."""
    var, mean = torch.var_mean(a, dim=(2, 3), unbiased=False)
    return mean, (var + 1e-5).sqrt()


def global_bn_loss(inputs, layers) -> torch.Tensor:
    """Mean over layers of ||batch mean - running mean|| + ||batch std - running std|| (ZeroQ's loss)."""
    total = 0.0
    for a, bn in zip(inputs, layers, strict=True):
        mean, std = batch_stats(a)
        total = total + torch.linalg.vector_norm(mean - bn.running_mean) \
            + torch.linalg.vector_norm(std - (bn.running_var + bn.eps).sqrt())
    return total / max(len(layers), 1)


@register_generator("bn", BnOptions, "CNNs with BatchNorm: match each BatchNorm's running statistics (ZeroQ-style)",
                    lambda model: no_batchnorm(model, "bn"))
def generate_bn(model: nn.Module, req: Request, cfg: BnOptions) -> Generated:
    layers = [m for _, m in batchnorms(model)]
    labels = target_classes(req, torch.Generator().manual_seed(req.seed))
    with InputHooks(layers) as hooks:
        def loss_fn(x, logits, y, gen, start):
            loss = global_bn_loss(hooks.inputs, layers)
            return loss, {"bn": loss.item()}
        out = optimise(model, req, cfg, loss_fn, labels, "synthesize (bn)")
    out.info["bn_layers"] = len(layers)
    return out


@torch.no_grad()
def class_centres(model: nn.Module, layers: list[nn.Module], real: torch.Tensor, batch_size: int = 50):
    """From the real images: the class the float model predicts for each, and per deep layer the per-class
    centres of the per-image statistics ({class: (mean [C], std [C])}) and the spread of those statistics over
    all real images (the unit of the distortion noise)."""
    per_mean = [[] for _ in layers]
    per_std = [[] for _ in layers]
    preds = []
    model.eval()
    with InputHooks(layers) as hooks:
        for i in range(0, len(real), batch_size):
            preds.append(model(real[i:i + batch_size]).argmax(1))
            for k, a in enumerate(hooks.inputs):
                m, s = image_stats(a)
                per_mean[k].append(m)
                per_std[k].append(s)
    preds = torch.cat(preds)
    classes = sorted(set(preds.tolist()))
    centres, spread = [], []
    for k in range(len(layers)):
        means, stds = torch.cat(per_mean[k]), torch.cat(per_std[k])
        centres.append({c: (means[preds == c].mean(0), stds[preds == c].mean(0)) for c in classes})
        spread.append((means.std(0, unbiased=False), stds.std(0, unbiased=False)))
    return preds, classes, centres, spread


def fdda_unfit(model: nn.Module) -> str | None:
    return no_batchnorm(model, "fdda", flat=False)


@register_generator("fdda", FddaOptions, "CNNs with BatchNorm, with real images: per-class BatchNorm statistics of "
                    "the real images as class centres, centralized + distorted losses in the deep layers (FDDA)",
                    fdda_unfit, needs_real=True)
def generate_fdda(model: nn.Module, req: Request, cfg: FddaOptions) -> Generated:
    if req.real is None or len(req.real) == 0:
        raise VitqError("--synthetic-generator fdda learns per-class statistics from real images: use it with "
                        "--calib DIR --augment-synthetic N (data-free runs: bn)")
    layers = [m for _, m in batchnorms(model, flat=False)]  # per-image statistics need [B, C, H, W]
    n_deep = max(1, round(cfg.deep_fraction * len(layers)))
    shallow, deep = layers[:len(layers) - n_deep], layers[len(layers) - n_deep:]
    dev = next(iter(model.parameters()), torch.empty(0)).device
    preds, classes, centres, spread = class_centres(model, deep, req.real.to(dev))
    labels = target_classes(req, torch.Generator().manual_seed(req.seed), pool=classes)
    # per deep layer: the centre of each image's target class, gathered once for the whole set
    c_mean = [torch.stack([centres[k][int(c)][0] for c in labels]) for k in range(len(deep))]
    c_std = [torch.stack([centres[k][int(c)][1] for c in labels]) for k in range(len(deep))]

    with InputHooks(shallow + deep) as hooks:
        def loss_fn(x, logits, y, gen, start):
            ins = hooks.inputs
            g_loss = global_bn_loss(ins[:len(shallow)], shallow) if shallow else torch.zeros(())
            central = distorted = 0.0
            for k, a in enumerate(ins[len(shallow):]):
                m, s = image_stats(a)
                cm, cs = c_mean[k][start:start + len(y)], c_std[k][start:start + len(y)]
                central = central + _dist(m, cm) + _dist(s, cs)
                nm = cm + cfg.noise * spread[k][0] * torch.randn(cm.shape, generator=gen).to(cm.device)
                ns = cs + cfg.noise * spread[k][1] * torch.randn(cs.shape, generator=gen).to(cs.device)
                distorted = distorted + _dist(m, nm) + _dist(s, ns)
            central, distorted = central / len(deep), distorted / len(deep)
            loss = g_loss + cfg.class_weight * (central + distorted)
            return loss, {"bn": float(g_loss.detach()), "central": central.item(), "distorted": distorted.item()}
        out = optimise(model, req, cfg, loss_fn, labels, "synthesize (fdda)")
    out.info.update({"bn_layers": len(layers), "deep_layers": len(deep), "real_images": len(req.real),
                     "classes": len(classes)})
    return out


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over images of the L2 distance between per-image statistics [B, C]."""
    return torch.linalg.vector_norm(a - b, dim=1).mean()

