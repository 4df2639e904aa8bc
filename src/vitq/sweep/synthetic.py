"""Synthetic calibration images in a sweep, as ``vitq quantize --calib synthetic:N`` (data-free) and
``--augment-synthetic N`` (real + synthetic, e.g. FDDA) make them:

    calib: synthetic:32                    # 32 generated images only (num_calib is N)
    augment_synthetic: 32                  # or: the real draw of num_calib images plus 32 generated ones
    synthetic: {generator: psaq, options: {iters: 100}, budget_min: 30}   # --synthetic-generator/-option/--budget-min
    synthetic_dir: path                    # where sets are written as PNG folders (default STORE/synthetic)

``synthetic`` (generator ``auto`` by default) is part of the job's config, so the job key covers the generator and
its options (a job without synthetic images has neither key in its config, as before they existed);
``synthetic_dir`` is not (a set's folder is named by its own key: the model's weights, generator, options, seed,
count and the real images it learned from). The sweep makes each set once per (model, calibration draw, generator
settings) in one Ray task and every job of it (each bit width, method, ...) calibrates on that set; a later sweep
reads it back from its PNG folder. The job's record keeps ``calib_source`` as ``vitq quantize`` writes it: the
generator, its options and ``made.seconds``, the generation time (also when the set was read back).
"""

from __future__ import annotations

import numbers

from vitq.errors import VitqError

SYNTHETIC_FIELDS = ("generator", "options", "budget_min")


def resolve_synthetic(cfg: dict) -> None:
    """Check and normalise a job's synthetic keys in place: ``calib: synthetic[:N]`` becomes ``synthetic:N`` with
    ``num_calib`` N; ``synthetic`` becomes ``{generator, options, budget_min}`` when images are generated; a job
    that generates none loses both keys (its config and key stay those of a grid without them)."""
    from vitq.calib import synthetic_count
    from vitq.synth import check_options

    n = synthetic_count(cfg["calib"])
    aug = cfg["augment_synthetic"]
    if aug is not None and (isinstance(aug, bool) or not isinstance(aug, int) or aug <= 0):
        raise VitqError(f"grid key 'augment_synthetic': {aug!r} (expected a positive number of synthetic images "
                        "added to the real draw)")
    if n is not None:
        if cfg["num_calib"] not in (None, n):
            raise VitqError(f"grid: calib {cfg['calib']} with num_calib {cfg['num_calib']} (the number of synthetic "
                            "images is the N of synthetic:N; leave num_calib out)")
        if aug:
            raise VitqError(f"grid: augment_synthetic with calib {cfg['calib']} (every image is synthetic already; "
                            "augment_synthetic adds synthetic images to a real calib folder)")
        cfg["calib"], cfg["num_calib"] = f"synthetic:{n}", n  # synthetic (32 by default) is synthetic:32
    given = cfg["synthetic"]
    if n is None and not aug:
        if given is not None:
            raise VitqError("grid key 'synthetic' given, but no job image is synthetic (use calib: synthetic:N or "
                            "augment_synthetic: N)")
        del cfg["synthetic"], cfg["augment_synthetic"]  # a real-only job's config (and key) as before these keys
        return
    if not isinstance(given or {}, dict) or set(given or {}) - set(SYNTHETIC_FIELDS):
        raise VitqError(f"grid key 'synthetic': {given!r} (expected a mapping of {', '.join(SYNTHETIC_FIELDS)})")
    given = dict(given or {})
    name = given.get("generator") or "auto"
    options = dict(given.get("options") or {})
    budget = given.get("budget_min")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real) or budget <= 0):
        raise VitqError(f"grid key 'synthetic': budget_min {budget!r} (expected a positive number of minutes)")
    gen = check_options(name, options, "grid key 'synthetic': option")
    if gen is not None and gen.needs_real and n is not None:
        raise VitqError(f"grid: generator {name} learns from real images; use a real calib folder with "
                        "augment_synthetic: N (data-free: bn for CNNs, psaq for transformers)")
    cfg["synthetic"] = {"generator": name, "options": options, "budget_min": budget}
    if aug is None:
        del cfg["augment_synthetic"]


def uses_synthetic(cfg: dict) -> bool:
    return cfg.get("synthetic") is not None


def calib_with_synthetic(spec: dict, cfg: dict, directory: str, threads: int = 1) -> dict:
    """The calibration images of a job with synthetic ones (what :func:`vitq.sweep.job.calib_data` gives for a
    real draw), made by :func:`vitq.calib.calib_source` as :func:`vitq.quantize` makes them, with ``source``: the
    record ``vitq quantize`` keeps as ``calib_source``."""
    import numpy as np
    import torch

    from vitq.calib import calib_source, synthetic_count
    from vitq.data import model_transform
    from vitq.sweep.job import calib_data, float_model

    torch.set_num_threads(threads)
    model = float_model(spec)
    files, skipped, calib = [], [], cfg["calib"]
    if synthetic_count(calib) is None:
        real = calib_data(spec, calib, cfg["num_calib"], cfg["seed"], cfg["batch_size"], threads)
        files, skipped, calib = real["files"], real["skipped"], torch.as_tensor(real["images"])
    s = cfg["synthetic"]
    settings = {"generator": s["generator"], "options": s["options"], "budget_min": s["budget_min"],
                "directory": directory, "transform": model_transform(model)[1]}
    images, source = calib_source(model, calib, cfg.get("augment_synthetic"), settings, cfg["seed"], progress=False)
    return {"images": np.ascontiguousarray(torch.as_tensor(images).float().numpy()), "files": files,
            "skipped": skipped, "source": source}


def synthesize_seconds(record: dict | None) -> float | None:
    """The generation time of a job's synthetic set (from its record; None without synthetic images)."""
    made = (((record or {}).get("calib_source") or {}).get("synthetic") or {}).get("made") or {}
    return made.get("seconds")
