"""The Python API: the same steps as the CLI, on any model built from timm's parts.

    qmodel = vitq.prepare(model, vitq.Scheme("fq", w_bits=4, a_bits=8), method="fqvit")
    vitq.calibrate(qmodel, calib_images, method="fqvit")
    vitq.refine(qmodel, model, calib_images, refiner="evolq")      # optional
    vitq.round_weights(qmodel, calib_images, how="gptq")           # optional: GPTQ weight rounding
    metrics = vitq.evaluate(qmodel, model, val_batches)
    vitq.save(qmodel, "out/"); qmodel2 = vitq.load(model, "out/")
"""

from __future__ import annotations

import inspect
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import vitq.methods  # noqa: F401  (registers the built-in methods)
import vitq.refine  # noqa: F401  (registers the built-in refiners)
from vitq.calib import CalibData, as_calib, calib_source, synthetic_count  # noqa: F401  (vitq.api.as_calib)
from vitq.errors import VitqError
from vitq.prepare import prepare as prepare_model
from vitq.recipes import choose as choose_recipe
from vitq.refine.gptq import round_weights  # noqa: F401  (part of the API: vitq.round_weights)
from vitq.registry import get_method, get_refiner
from vitq.scheme import DEFAULT_A_BITS, DEFAULT_W_BITS, Scheme
from vitq.search import search as search_model


def _record(cfg) -> dict:
    """The options of a run for its results file: its config's record."""
    return cfg.record()


def prepare(model: nn.Module, scheme: Scheme | None = None, method: str | None = None,
            options: dict | None = None, **scheme_kwargs) -> nn.Module:
    """A quantization-ready copy of ``model``. ``method`` lets a method adjust the scheme it needs (e.g. its
    softmax quantizer kind) before quantizers are inserted."""
    scheme = scheme if scheme is not None else Scheme(**scheme_kwargs)
    if method is not None:
        scheme = get_method(method).adjust(scheme, options)
    return prepare_model(model, scheme)


def calibrate(qmodel: nn.Module, images, /, method: str = "fqvit", batch_size: int = 50, device="cpu",
              seed: int = 0, progress: bool = True, **options) -> dict:
    """Fill the quantizers from calibration images ([N, C, H, W] preprocessed, or a CalibData)."""
    entry = get_method(method)
    calib = as_calib(images, batch_size, device, seed, progress)
    torch.manual_seed(seed)
    qmodel.to(calib.device).eval()
    t0 = time.perf_counter()
    cfg = entry.make_config(options)
    entry.check_regime(getattr(qmodel, "vitq_scheme", None))
    info = entry.call(qmodel, calib, options=cfg) or {}
    info = {"method": method, "options": _record(cfg), **info, "seconds": time.perf_counter() - t0}
    return info


def refiner_chain(refiner) -> list[str]:
    """``"recon,evolq"`` or ``["recon", "evolq"]`` -> the refiner names in order (each must be registered)."""
    names = refiner.split(",") if isinstance(refiner, str) else list(refiner)
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise VitqError(f"--refine {refiner!r} has an empty refiner name (expected a comma-separated list, e.g. "
                        "recon,evolq)")
    for n in names:
        get_refiner(n)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise VitqError(f"--refine {refiner!r} names {', '.join(twice)} twice (expected each refiner once)")
    return names


@torch.no_grad()
def _calib_kl(qmodel: nn.Module, float_logits: list[torch.Tensor], calib: CalibData) -> float:
    """Mean KL(float || quant) over the calibration images (nats): the gain of each refiner in a chain."""
    total = 0.0
    for x, zf in zip(calib.batches(), float_logits, strict=True):
        lp, lq = F.log_softmax(zf, 1), F.log_softmax(qmodel(x).float(), 1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total / len(calib)


def refine(qmodel: nn.Module, float_model: nn.Module, images, /, refiner: str | list[str] = "evolq",
           batch_size: int = 50, device="cpu", seed: int = 0, progress: bool = True, after_step=None,
           **options) -> dict:
    """Improve an already-calibrated model (e.g. Evol-Q), scored against ``float_model``.

    ``refiner`` may be a chain, ``"recon,evolq"`` or a list, applied in order; the options of a chain are
    given per refiner (``recon={"iters": 500}, evolq={"passes": 1}``); a single refiner takes them either way, and
    an option named like a parameter of this function (Evol-Q's ``batch_size``) only per refiner
    (``evolq={"batch_size": 100}``: ``batch_size=`` is the calibration batches). Each step records its time and the
    KL(float || quant) on the calibration images before and after it. ``after_step(name, qmodel, step)`` is
    called after each step (e.g. to evaluate the model between the steps of a chain; it must leave the model
    as it found it)."""
    names = refiner_chain(refiner)
    if len(names) == 1 and not (set(options) == {names[0]} and isinstance(options[names[0]], dict)):
        per = {names[0]: options}
    else:
        stray = sorted(k for k in options if k not in names or not isinstance(options[k], dict))
        if stray:
            raise VitqError(f"options {stray} for the refiner chain {','.join(names)} must be given per refiner "
                            f"(e.g. {names[0]}={{...}})")
        per = {n: dict(options.get(n) or {}) for n in names}
    calib = as_calib(images, batch_size, device, seed, progress)
    qmodel.to(calib.device).eval()
    float_model.to(calib.device).eval()
    with torch.no_grad():
        float_logits = [float_model(x).float() for x in calib.batches()]
    kl = _calib_kl(qmodel, float_logits, calib)
    steps = []
    t_chain = time.perf_counter()
    for name in names:
        entry = get_refiner(name)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        opts, context = entry.split(per[name])
        cfg = entry.make_config(opts)
        info = entry.call(qmodel, float_model, calib, options=cfg, **context) or {}
        seconds = time.perf_counter() - t0
        kl_after = _calib_kl(qmodel, float_logits, calib)
        steps.append({"refiner": name, "options": _record(cfg), **info, "seconds": seconds,
                      "calib_kl": {"before": kl, "after": kl_after, "gain": kl - kl_after}})
        kl = kl_after
        if after_step is not None:
            after_step(name, qmodel, steps[-1])
    if len(steps) == 1:
        return steps[0]
    return {"refiner": ",".join(names), "chain": steps, "seconds": time.perf_counter() - t_chain,
            "calib_kl": {"before": steps[0]["calib_kl"]["before"], "after": kl,
                         "gain": steps[0]["calib_kl"]["before"] - kl}}


def refine_model(*args, **kwargs) -> dict:
    """:func:`refine` under another name: :func:`quantize`'s own parameter ``refine`` shadows the function."""
    return refine(*args, **kwargs)


def quantize(model: nn.Module, calib, scheme: Scheme | str | None = None, method: str | None = None,
             rounding: str | None = None, refine: str | list[str] | None = None, recipe: str | None = None, *,
             options: dict | None = None, refine_options: dict | None = None, batch_size: int = 50,
             device="cpu", seed: int = 0, progress: bool = True, val_batches=None, start: nn.Module | None = None,
             augment_synthetic: int | None = None, synthetic: dict | None = None, search: str | None = None,
             search_options: dict | None = None, after_step=None, **scheme_kwargs) -> tuple[nn.Module, dict]:
    """The one run order, model -> prepare -> calibrate -> round -> refine, that the CLI, the demo and the
    benchmarks call. Returns the quantized model and the record of the run (what goes into results.json).

    ``scheme`` is a :class:`Scheme` or a regime name (``fq`` / ``matmul``, with ``w_bits=``, ``a_bits=`` and
    the other Scheme fields as keywords); ``method`` a registered calibration method with its ``options``;
    ``rounding`` ``nearest`` (default) or ``gptq``; ``refine`` a refiner or a chain (``"recon,evolq"``) with
    ``refine_options={name: {...}}``. ``recipe`` (a name of ``vitq recipes`` or ``best``) fills only what is
    left unset here, as ``--recipe`` does on the command line. ``calib``: images [N, C, H, W] (preprocessed) or
    a CalibData; a recipe that asks for fewer images takes a seeded subset of them. ``calib="synthetic[:N]"``
    generates N images from the float model instead (data-free), ``augment_synthetic=N`` adds N synthetic images to
    the real ones; ``synthetic={"generator", "options", "directory", "budget_min"}`` says how (see
    :func:`vitq.calib.calib_source`), and ``record["calib_source"]`` what was done. ``start``: an already
    calibrated model (e.g. :func:`vitq.load`) to round and refine instead of preparing and calibrating anew.
    ``search="hago"`` with ``search_options={"min_speedup": 1.5}`` (or ``max_kl`` / ``min_agreement``, see
    :class:`vitq.search.hago.HagoOptions`) then chooses which of the target's quantizer groups to keep
    (:mod:`vitq.search`; ``record["search"]``); a recipe's keep_float is left to the search.
    ``after_step(name, qmodel, info)``: called after the weight rounding (name ``"base"``, info the record so
    far) and after each refiner of the chain (see :func:`refine`), e.g. to evaluate every stage of one run."""
    if isinstance(scheme, Scheme):
        if scheme_kwargs:
            raise VitqError(f"scheme fields {sorted(scheme_kwargs)} given beside a Scheme object")
        regime = scheme.name
    else:
        regime = scheme or "fq"
    refine_options = {k: dict(v) for k, v in (refine_options or {}).items()}
    record: dict = {"recipe": None}
    if recipe is not None:
        w_bits = scheme.w_bits if isinstance(scheme, Scheme) else scheme_kwargs.get("w_bits", DEFAULT_W_BITS)
        a_bits = scheme.a_bits if isinstance(scheme, Scheme) else scheme_kwargs.get("a_bits", DEFAULT_A_BITS)
        target = scheme.target if isinstance(scheme, Scheme) else scheme_kwargs.get("target")
        deploy = target not in (None, "none")
        chosen, why = choose_recipe(recipe, regime if scheme is not None or not deploy else None, w_bits, a_bits,
                                    target=target)
        regime = regime if scheme is not None else chosen.scheme
        plan = chosen.plan(str(device))
        method = method or plan["method"]
        rounding = rounding or plan["rounding"]
        refine = refine if refine is not None else plan["refine"]
        options = {**plan["options"], **(options or {})}
        for name, opts in plan["refine_options"].items():
            refine_options[name] = {**opts, **refine_options.get(name, {})}
        if search is not None and "keep_float" not in scheme_kwargs and plan["scheme"].pop("keep_float", None):
            record["recipe_keep_float_left_to_search"] = True
        if not isinstance(scheme, Scheme):
            scheme_kwargs = {**plan["scheme"], **scheme_kwargs}
        if plan["num_calib"] is not None and synthetic_count(calib) is None:
            calib = _subset(calib, plan["num_calib"], seed)
        record["recipe"] = {"name": chosen.name, "asked": recipe, "why": why, "plan": plan}
    if start is not None and (method or options or scheme is not None or scheme_kwargs or recipe):
        raise VitqError("start= brings its own scheme and calibration: give no scheme, method, options or recipe")
    method = method or "fqvit"
    if start is None:
        if not isinstance(scheme, Scheme):
            scheme = Scheme(regime, **scheme_kwargs)
        get_method(method).make_config(options)  # every option is checked before any work
    chain = refiner_chain(refine) if refine else []
    for name in chain:
        entry = get_refiner(name)
        entry.make_config(entry.split(refine_options.get(name))[0])
    stray = sorted(set(refine_options) - set(chain))
    if stray:
        raise VitqError(f"refine_options for {stray}, which are not in the refiner chain {chain}")
    calib, record["calib_source"] = calib_source(model, calib, augment_synthetic, synthetic, seed, progress)
    calib = as_calib(calib, batch_size, device, seed, progress)
    if start is None:
        qmodel = prepare(model, scheme, method=method, options=options)
        if getattr(qmodel, "vitq_notes", None):  # what a family kept in float and why (the generic path)
            record["prepare_notes"] = list(qmodel.vitq_notes)
        record["calibration"] = calibrate(qmodel, calib, method=method, seed=seed, **(options or {}))
    else:
        qmodel = start.to(calib.device)
        record["calibration"] = {"start": "a calibrated model given to quantize", "seconds": 0.0}
    record.update({"scheme": qmodel.vitq_scheme.to_dict(), "num_calib": len(calib)})
    record["weight_rounding"] = round_weights(qmodel, calib, how=rounding or "nearest")
    record["refinement"] = None
    if after_step is not None:
        after_step("base", qmodel, record)
    if chain:
        per = {n: dict(refine_options.get(n, {})) for n in chain}
        if val_batches is not None:
            for n in chain:
                if "val_batches" in inspect.signature(get_refiner(n).fn).parameters:
                    per[n]["val_batches"] = val_batches
        record["refinement"] = refine_model(qmodel, model, calib, chain, seed=seed, after_step=after_step,
                                            **(per if len(chain) > 1 else per[chain[0]]))
    record["search"] = None
    if search is not None:
        record["search"] = search_model(qmodel, model, calib, how=search, progress=progress, **(search_options or {}))
    return qmodel, record


def _subset(images, num: int, seed: int):
    """``num`` of the images, a seeded choice in their order (all of them when there are no more)."""
    if isinstance(images, CalibData):
        if num >= len(images):
            return images
        keep = sorted(random.Random(seed).sample(range(len(images)), num))
        return CalibData(images.images[keep], batch_size=images.batch_size, device=images.device,
                         progress=images.progress, seed=images.seed)
    images = torch.as_tensor(images)
    if num >= images.shape[0]:
        return images
    return images[sorted(random.Random(seed).sample(range(images.shape[0]), num))]
