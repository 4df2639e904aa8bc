"""The parts every synthetic-image generator shares: the registry, the request, the optimisation loop (seeded,
with a progress bar, an ETA and a time budget) and the activation hooks the losses read.

A generator optimises a batch of images in the model's preprocessed space ([B, C, H, W], normalised by the
model's mean/std) so that the float model's own statistics say they look like its training data. Each batch
starts from seeded Gaussian noise; after every step the pixels are clipped to what an 8-bit image can hold, so
the images survive being written as PNG files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vitq.errors import VitqError
from vitq.options import Options, opt


@dataclass(frozen=True)
class LoopOptions(Options):
    """Options every generator has (flags ``--synthetic-<name>``)."""

    iters: int = opt(200, "optimisation steps per batch of images", minimum=1)
    lr: float = opt(0.2, "Adam learning rate on the normalised pixels (cosine decay to 0)", above=0)
    batch_size: int = opt(32, "images optimised together (BatchNorm statistics are batch statistics)", minimum=1)
    ce_weight: float = opt(1.0, "weight of the cross-entropy toward each image's target class", minimum=0)
    tv_weight: float = opt(0.0, "weight of the total-variation smoothness prior", minimum=0)
    # DeepInversion's loop (what PSAQ-ViT runs); the defaults here are the plain loop bn and fdda use
    rounds: int = opt(1, "rounds the steps are split into, each restarting the learning-rate schedule (and "
                         "widening the jitter)", minimum=1)
    warmup: float = opt(0.0, "share of each round's steps with a linear learning-rate warm-up before the cosine "
                             "decay", minimum=0, below=1)
    jitter: int = opt(0, "random shift (pixels, torch.roll on both axes) of the images before each step, up to "
                         "this many in the first round, twice as many in the second, ...", minimum=0)
    flip: bool = opt(False, "random horizontal flip of the images before each step")
    beta1: float = opt(0.9, "Adam beta1", minimum=0, below=1)
    beta2: float = opt(0.999, "Adam beta2", minimum=0, below=1)


@dataclass
class Request:
    """What a generator is asked for: ``num`` images of ``shape`` (C, H, W) in the space normalised by
    ``mean``/``std``; ``real`` (preprocessed real images) where the generator learns from them (FDDA)."""

    num: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int = 0
    budget_s: float | None = None
    progress: bool = True
    real: torch.Tensor | None = None
    num_classes: int = 1000


@dataclass
class Generated:
    """Images [N, C, H, W] (normalised), their target classes, and how the run went (iterations run per
    batch, the first and last loss of each batch, seconds)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Generator:
    """A registered generator: ``fn(model, request, cfg) -> Generated``; ``unfit(model)`` says in one line why
    it cannot run on a model (None when it can); ``needs_real``: it learns from real calibration images."""

    name: str
    fn: Callable
    config: type[Options]
    description: str
    unfit: Callable
    needs_real: bool = False


GENERATORS: dict[str, Generator] = {}


def register_generator(name: str, config: type[Options], description: str, unfit: Callable,
                       needs_real: bool = False):
    def deco(fn):
        if name in GENERATORS:
            raise ValueError(f"generator {name!r} registered twice")
        GENERATORS[name] = Generator(name, fn, config, description, unfit, needs_real)
        return fn
    return deco


def get_generator(name: str) -> Generator:
    if name not in GENERATORS:
        raise VitqError(f"--synthetic-generator {name!r} is unknown (expected auto or one of "
                        f"{', '.join(sorted(GENERATORS))})")
    return GENERATORS[name]


def model_name(model: nn.Module) -> str:
    """The model as a user knows it: timm's architecture name where it has one, else its class."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{arch} ({type(model).__name__})" if arch else type(model).__name__


# ------------------------------------------------------------------------------------------------ the loop
def pixel_bounds(req: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixel 0 and pixel 255 per channel, shaped [1, C, 1, 1]."""
    mean = torch.tensor(req.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(req.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (a smoothness prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def round_of(step: int, iters: int, rounds: int) -> tuple[int, int, int]:
    """(round, step within it, the round's length) of ``step`` when ``iters`` steps are split into ``rounds``
    near-equal rounds."""
    bounds = [round(r * iters / rounds) for r in range(rounds + 1)]
    r = max(k for k in range(rounds) if bounds[k] <= step)
    return r, step - bounds[r], bounds[r + 1] - bounds[r]


def learning_rate(cfg: LoopOptions, step: int) -> float:
    """Per round: a linear warm-up over ``warmup`` of its steps, then a cosine decay to 0 (one round without
    warm-up: the plain cosine schedule)."""
    _, t, n = round_of(step, cfg.iters, cfg.rounds)
    warm = int(round(cfg.warmup * n))
    if t < warm:
        return cfg.lr * (t + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (n - warm)))


def augment(x: torch.Tensor, cfg: LoopOptions, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """What the model sees at ``step``: ``x`` rolled by one random offset on both axes (up to ``jitter`` pixels
    times the round's number) and flipped left-right with probability 1/2, both drawn from ``gen`` (nothing is
    drawn for an augmentation that is off, so a loop without them draws what it always drew). Returns the
    image and the draws."""
    drawn = {}
    if cfg.jitter:
        lim = cfg.jitter * (round_of(step, cfg.iters, cfg.rounds)[0] + 1)
        off = int(torch.randint(-lim, lim + 1, (1,), generator=gen))
        drawn["shift"] = off
        if off:
            x = torch.roll(x, shifts=(off, off), dims=(2, 3))
    if cfg.flip:
        drawn["flip"] = bool(torch.rand(1, generator=gen) < 0.5)
        if drawn["flip"]:
            x = torch.flip(x, dims=(3,))
    return x, drawn


def target_classes(req: Request, gen: torch.Generator, pool: list[int] | None = None) -> torch.Tensor:
    """Target classes of all ``req.num`` images: each class of ``pool`` (default every class) in turn, in a
    seeded order, so that a set covers as many classes as it has images."""
    pool = list(range(req.num_classes)) if pool is None else list(pool)
    order = torch.randperm(len(pool), generator=gen)
    reps = -(-req.num // len(pool))
    return torch.tensor([pool[int(i)] for i in order.repeat(reps)[:req.num]], dtype=torch.long)


def optimise(model: nn.Module, req: Request, cfg: LoopOptions, loss_fn: Callable, labels: torch.Tensor,
             desc: str) -> Generated:
    """The loop of every generator: batch by batch, seeded noise -> Adam steps on
    ``loss_fn(seen, logits, y, gen, start) -> (loss, parts)`` (``seen``: the images as the model saw them this
    step, after the random shift and flip where they are on; ``start``: the batch's first index) plus
    cross-entropy toward ``labels`` and the TV prior on the images.

    ``req.budget_s`` caps the whole run: each batch gets an equal share of what is left, and a batch that runs
    out stops early (its iterations are recorded). Everything random comes from generators seeded with
    ``req.seed`` and the batch index, so a seeded run repeats itself on the same machine and thread count."""
    dev = next(iter(model.parameters()), torch.empty(0)).device
    lo, hi = (b.to(dev) for b in pixel_bounds(req))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [(i, min(i + cfg.batch_size, req.num)) for i in range(0, req.num, cfg.batch_size)]
    out, runs = [], []
    t_start = time.perf_counter()
    bar = tqdm(total=len(batches) * cfg.iters, desc=desc, disable=not req.progress, leave=False,
               dynamic_ncols=True, unit="step")
    try:
        for b, (i, j) in enumerate(batches):
            gen = torch.Generator().manual_seed(req.seed * 100003 + b)
            x = torch.randn((j - i, *req.shape), generator=gen).to(dev)
            x = torch.max(torch.min(x, hi), lo).requires_grad_(True)
            y = labels[i:j].to(dev)
            optim = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
            deadline = None
            if req.budget_s is not None:
                left = req.budget_s - (time.perf_counter() - t_start)
                deadline = time.perf_counter() + max(left, 0.0) / (len(batches) - b)
            first = last = None
            done, draws = 0, []
            for step in range(cfg.iters):
                if deadline is not None and step > 0 and time.perf_counter() > deadline:
                    break
                for g in optim.param_groups:
                    g["lr"] = learning_rate(cfg, step)
                optim.zero_grad(set_to_none=True)
                seen, drawn = augment(x, cfg, step, gen)
                logits = model(seen)
                loss, parts = loss_fn(seen, logits, y, gen, i)
                if cfg.ce_weight:
                    ce = nn.functional.cross_entropy(logits, y)
                    loss = loss + cfg.ce_weight * ce
                    parts = {**parts, "ce": ce.item()}
                if cfg.tv_weight:
                    loss = loss + cfg.tv_weight * total_variation(x)
                if not torch.isfinite(loss):
                    raise VitqError(f"{desc}: the loss became {loss.item()} at step {step} (try a smaller "
                                    "--synthetic-lr)")
                loss.backward()
                optim.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
                parts = {"total": loss.item(), **parts}
                first = first or parts
                last = parts
                draws.append(drawn)
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
            bar.update(cfg.iters - done)
            out.append(x.detach().cpu().clone())
            runs.append({"images": j - i, "iterations": done, "first_loss": first, "last_loss": last})
            if cfg.jitter or cfg.flip:  # the augmentation draws, summed up (a seeded run repeats them)
                shifts = [d["shift"] for d in draws if "shift" in d]
                runs[-1]["augment"] = {"shifted": sum(v != 0 for v in shifts), "shift_sum": sum(shifts),
                                       "largest_shift": max(map(abs, shifts), default=0),
                                       "flipped": sum(d.get("flip", False) for d in draws)}
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
    seconds = time.perf_counter() - t_start
    iters = [r["iterations"] for r in runs]
    info = {"batches": runs, "iterations_run": sum(iters), "iterations_asked": cfg.iters * len(batches),
            "cut_by_budget": any(n < cfg.iters for n in iters), "seconds": seconds}
    return Generated(torch.cat(out), labels.clone(), info)


# ------------------------------------------------------------------------------------------------ hooks
class InputHooks:
    """Records the input of each module of ``modules`` on every forward (a context manager)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.inputs: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = []

    def __enter__(self) -> InputHooks:
        for k, m in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(self._hook(k)))
        return self

    def _hook(self, k: int):
        def hook(module, args, output):
            self.inputs[k] = args[0]
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def batchnorms(model: nn.Module, flat: bool = True) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers that carry running statistics, in definition order: 2-d ones, and with
    ``flat`` also 1-d ones (e.g. LeViT's, over flattened tokens)."""
    kinds = (nn.BatchNorm2d, nn.BatchNorm1d) if flat else (nn.BatchNorm2d,)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, kinds) and m.running_mean is not None and m.running_var is not None]


def no_batchnorm(model: nn.Module, generator: str, flat: bool = True) -> str | None:
    """Why a BatchNorm-statistics generator cannot run on ``model`` (None when it can)."""
    if batchnorms(model, flat):
        return None
    return (f"--synthetic-generator {generator} matches BatchNorm statistics, and {model_name(model)} has no "
            "BatchNorm layer with running statistics (for vision transformers use psaq)")
