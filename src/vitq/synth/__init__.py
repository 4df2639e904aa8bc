"""Synthetic calibration images: for users with no images they may read, or too few.

Generators (a registry, :data:`GENERATORS`): ``bn`` (ZeroQ-style BatchNorm-statistics matching, CNNs),
``fdda`` (per-class BatchNorm statistics of the real images, CNNs, used together with the real images) and
``psaq`` (patch-similarity entropy of the self-attention inputs, vision transformers). ``auto`` picks fdda when
real images are given and the model has BatchNorm, bn for other models with BatchNorm, psaq for transformers.

    images, record = vitq.synth.synthesize(model, 32, seed=0, directory="synthetic/")

The images come back preprocessed ([N, C, H, W], the model's normalisation) and, with ``directory``, are
written there as PNG files and read back from there by a later call that asks for the same set.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

import vitq.synth.bn  # noqa: F401  (registers bn, fdda)
import vitq.synth.psaq  # noqa: F401  (registers psaq)
from vitq.errors import VitqError
from vitq.synth import store
from vitq.synth.base import GENERATORS, Generated, Generator, LoopOptions, Request, get_generator, model_name

__all__ = ["GENERATORS", "Generated", "check_options", "choose_generator", "synthesize"]

log = logging.getLogger("vitq")


def check_options(generator: str, options: dict, what: str) -> Generator | None:
    """Refuse, before anything is generated, options that ``generator`` does not have (for ``auto``: that no
    generator has), naming them as ``what`` (the flag or grid key they came from). Returns the named generator
    (None for ``auto``, which resolves only once the model is known)."""
    if generator == "auto":
        names = set().union(*(g.config.field_names() for g in GENERATORS.values()))
        unknown = sorted(set(options) - names)
        if unknown:
            raise VitqError(f"{what} {unknown[0]} is not an option of any generator (options: "
                            f"{', '.join(sorted(names))})")
        LoopOptions.build({k: v for k, v in options.items() if k in LoopOptions.field_names()}, "synthetic")
        return None
    gen = get_generator(generator)
    gen.config.build(options, "synthetic")
    return gen


def choose_generator(model: nn.Module, name: str = "auto", with_real: bool = False) -> str:
    """The generator ``name`` resolves to for ``model``; refuses, in one line naming the model, one that does
    not apply (e.g. FDDA on a model without BatchNorm)."""
    if name == "auto":
        order = ("fdda", "bn", "psaq") if with_real else ("bn", "psaq")
        for cand in order:
            if GENERATORS[cand].unfit(model) is None:
                return cand
        raise VitqError(f"no synthetic-image generator applies to {model_name(model)}: it has neither BatchNorm "
                        "layers (bn, fdda) nor self-attention qkv/query/q_proj projections (psaq)")
    gen = get_generator(name)
    why = gen.unfit(model)
    if why:
        raise VitqError(why)
    if gen.needs_real and not with_real:
        raise VitqError(f"--synthetic-generator {name} learns from real images: use --calib DIR --augment-synthetic "
                        "N (data-free: bn for CNNs, psaq for transformers)")
    return name


def _num_classes(model: nn.Module, shape) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    dev = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        return int(model.eval()(torch.zeros(1, *shape, device=dev)).shape[-1])


def synthesize(model: nn.Module, num: int, generator: str = "auto", options: dict | None = None, seed: int = 0,
               real: torch.Tensor | None = None, directory: str | os.PathLike | None = None,
               budget_min: float | None = None, progress: bool = True,
               transform: dict | None = None) -> tuple[torch.Tensor, dict]:
    """``num`` synthetic images for ``model`` (preprocessed, [num, C, H, W]) and the record of how they were made.

    ``options``: the generator's (see ``vitq.synth.GENERATORS[name].config``); ``real``: preprocessed real
    images (FDDA learns its class centres from them); ``directory``: where the set is written as PNG files, and
    read from when it already holds this set; ``budget_min`` caps the generation time (the record says how many
    iterations ran); ``transform``: the model's input description (default :func:`vitq.data.model_transform`)."""
    from vitq.data import model_transform

    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise VitqError(f"synthetic:{num} is invalid (expected a positive number of images, e.g. synthetic:32)")
    if budget_min is not None and not budget_min > 0:
        raise VitqError(f"--budget-min {budget_min} is invalid (expected a positive number of minutes)")
    name = choose_generator(model, generator, real is not None)
    gen = get_generator(name)
    cfg = gen.config.build(options, "synthetic")
    desc = transform or model_transform(model)[1]
    shape = tuple(int(v) for v in desc["input_size"])
    mean, std = tuple(desc["mean"]), tuple(desc["std"])
    if real is not None:
        real = torch.as_tensor(real).float()
        if tuple(real.shape[1:]) != shape:
            raise VitqError(f"real images of shape {tuple(real.shape[1:])} beside synthetic ones of {shape}")
    record = {"generator": name, "asked": generator, "options": cfg.record(), "seed": seed, "num": num,
              "budget_min": budget_min, "input_size": list(shape)}
    folder = key = None
    if directory is not None:
        key = store.set_key({"model": store.model_digest(model), "generator": name,
                             "options": store.key_options(cfg.to_dict()), "seed": seed, "num": num, "shape": shape,
                             "mean": mean, "std": std}, real)
        folder = store.set_folder(os.fspath(directory), model_name(model).split(" ")[0], name, key)
        t0 = time.perf_counter()
        found = store.read_set(folder, key, mean, std)
        if found is not None:
            images, labels, manifest = found
            log.info("synthetic: reusing %d %s images from %s (made in %.1f s, %d of %d iterations)", num, name,
                     folder, manifest["made"]["seconds"], manifest["made"]["iterations_run"],
                     manifest["made"]["iterations_asked"])
            return images, {**record, "dir": os.path.abspath(folder), "key": key, "reused": True,
                            "seconds": time.perf_counter() - t0, "made": manifest["made"],
                            "labels": labels.tolist()}
    req = Request(num, shape, mean, std, seed, None if budget_min is None else budget_min * 60.0, progress, real,
                  _num_classes(model, shape))
    torch.manual_seed(seed)
    out = gen.fn(model, req, cfg)
    pixels = store.to_uint8(out.images, mean, std)
    images = store.from_uint8(pixels, mean, std)  # what a reuse reads back, so both runs calibrate alike
    made = {**out.info, "labels_from": "the float model's predictions on the real images" if gen.needs_real
            else "target classes drawn by the generator"}
    if made["cut_by_budget"]:
        log.warning("synthetic: --budget-min %s stopped generation after %d of %d iterations", budget_min,
                    made["iterations_run"], made["iterations_asked"])
    log.info("synthetic: %d %s images in %.1f s (%d of %d iterations)", num, name, made["seconds"],
             made["iterations_run"], made["iterations_asked"])
    if folder is not None:
        store.write_set(folder, pixels, out.labels, {"key": key, "model": model_name(model), **record, "made": made})
        log.info("synthetic: wrote %d PNG images to %s (delete the folder to make a fresh set)", num, folder)
    return images, {**record, "dir": os.path.abspath(folder) if folder else None, "key": key, "reused": False,
                    "seconds": made["seconds"], "made": made, "labels": out.labels.tolist()}
