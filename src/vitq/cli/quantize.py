"""``vitq quantize``: calibrate (and optionally round and refine) a model, evaluate it, save its state."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch

from vitq.cli.common import (
    EntryOptions,
    build_model,
    check_class_map,
    checkpoint_default,
    common_flags,
    evaluate_on,
    given,
    input_size,
    load_images,
    read_labels,
    resolve_device,
    summary_line,
    versions,
)
from vitq.cli.flags import add_entry_flags, entry_options
from vitq.cli.search import add_search_flags, search_settings
from vitq.cli.synthetic import add_synthetic_flags, synthetic_settings
from vitq.errors import VitqError
from vitq.recipes import MEASURED, choose
from vitq.scheme import DEFAULT_A_BITS, DEFAULT_W_BITS
from vitq.state import OutputDir
from vitq.targets import GROUPS, TARGETS

log = logging.getLogger("vitq")


def add_command(sub, argv: Sequence[str]) -> None:
    from vitq.registry import METHODS, REFINERS

    q = sub.add_parser("quantize", help="calibrate (and optionally refine) a model, evaluate it, save its state",
                       epilog="Each method and refiner has its own options: vitq quantize --method NAME --help "
                              "(or --refine NAME --help) lists them; vitq methods lists the names.")
    common_flags(q)
    q.add_argument("--calib", required=True,
                   help="calibration image folder (sub-folders of images; names unused), or synthetic[:N] for N "
                        "generated images (data-free, default 32; see the synthetic flags)")
    q.add_argument("--num-calib", type=int, default=None, help="seeded choice of N calibration images (default all)")
    q.add_argument("--val", default=None, help="evaluation image folder")
    q.add_argument("--num-val", type=int, default=None, help="seeded choice of N evaluation images (default all)")
    q.add_argument("--scheme", choices=("fq", "matmul"), default=None, help="quantization regime (default fq)")
    q.add_argument("--w-bits", type=int, default=None, help="weight bits (default 8)")
    q.add_argument("--a-bits", type=int, default=None, help="activation bits (default 8)")
    q.add_argument("--attn-bits", type=int, default=None, help="softmax-output bits (default --a-bits)")
    q.add_argument("--softmax-quantizer", default=None, help="quantizer kind for softmax outputs (see vitq methods)")
    q.add_argument("--gelu-quantizer", default=None, help="quantizer kind for the fc2 input after GELU, e.g. adalog")
    q.add_argument("--attn-granularity", choices=("tensor", "head"), default=None,
                   help="q/k/v quantizers: one scale per tensor (default) or per attention head")
    q.add_argument("--target", default=None, choices=tuple(TARGETS),
                   help="deployment target: build only the quantizers it runs as integer kernels (the rest stay "
                        "float, and the run says why); with --recipe best, a recipe it can ship (default none: "
                        "simulation, every quantizer of the scheme)")
    q.add_argument("--keep-float", default=None, metavar="GROUPS",
                   help=f"comma-separated quantizer groups left in float ({', '.join(GROUPS)})")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN:wBaB",
                   help="bits for modules matching a name pattern, e.g. 'head:w8a8' (repeatable)")
    q.add_argument("--method", default=None, help="calibration method (see vitq methods)")
    # see vitq.refine.gptq; default None so that a recipe can set it
    q.add_argument("--weight-rounding", choices=("nearest", "gptq"), default=None,
                   help="after --method: keep nearest rounding (default) or round the weights with GPTQ")
    q.add_argument("--refine", default=None,
                   help="refiner, or comma-separated refiners applied in order (e.g. recon,evolq; see vitq methods)")
    q.add_argument("--recipe", default=None, metavar="NAME",
                   help="best, or a recipe of vitq recipes: method, quantizer kinds and refiners for the regime and "
                        "bits asked (flags given explicitly win)")
    q.add_argument("--init-state", default=None, metavar="DIR",
                   help="start from a saved state (a previous --out) instead of calibrating")
    q.add_argument("--out", required=True,
                   help="output folder (must not exist unless --overwrite; missing parents are created)")
    add_search_flags(q, argv)
    add_synthetic_flags(q, argv)
    owners: dict = {}
    shown = {"method": given(argv, "--method"), "refiner": given(argv, "--refine")}
    for kind, entries in (("method", METHODS), ("refiner", REFINERS)):
        for entry in entries.values():
            if not entry.has_options:
                continue
            visible = shown[kind] == entry.name
            target = q.add_argument_group(f"options of {kind} {entry.name}") if visible else q
            add_entry_flags(EntryOptions(target, kind, entry.name, not visible, owners), entry)
    q.set_defaults(func=cmd_quantize, option_owners=owners)



def cmd_quantize(args) -> int:
    import vitq.api as api
    import vitq.cli.validate as validate
    from vitq.calib import CalibData, synthetic_count
    from vitq.data import model_transform
    from vitq.registry import get_method, get_refiner
    from vitq.scheme import A_BITS, DEFAULT_A_BITS, DEFAULT_W_BITS, W_BITS, Scheme
    from vitq.state import load, save, write_json

    progress = not args.quiet
    # ---- every check that needs no model, before the model is loaded
    out = OutputDir(args.out, args.overwrite)
    recipe_info = None
    if args.recipe is not None:
        recipe_info = apply_recipe(args)  # fills only the flags left unset
    search, search_options = search_settings(args)
    if args.init_state is None and args.method is None:
        raise VitqError("--method is required (or --init-state DIR to start from a saved state)")
    scheme_flags = {"--method": args.method, "--scheme": args.scheme, "--w-bits": args.w_bits,
                    "--a-bits": args.a_bits, "--attn-bits": args.attn_bits,
                    "--softmax-quantizer": args.softmax_quantizer, "--attn-granularity": args.attn_granularity,
                    "--override": args.override or None, "--gelu-quantizer": args.gelu_quantizer,
                    "--target": args.target, "--keep-float": args.keep_float}
    if args.init_state is not None and any(v is not None for v in scheme_flags.values()):
        given = ", ".join(k for k, v in scheme_flags.items() if v is not None)
        raise VitqError(f"--init-state {args.init_state} brings its own scheme and calibration; {given} would be "
                        "ignored (drop them, or calibrate anew without --init-state)")
    for flag, value in (("--batch-size", args.batch_size), ("--num-calib", args.num_calib),
                        ("--num-val", args.num_val)):
        validate.positive(flag, value)
    validate.non_negative("--num-workers", args.num_workers)
    method = get_method(args.method) if args.init_state is None else None
    chain = api.refiner_chain(args.refine) if args.refine else []
    validate.entry_options(args, args.option_owners, args.method, chain)
    method_opts = entry_options(args, method) if method else {}
    chain_opts = {name: entry_options(args, get_refiner(name)) for name in chain}
    if method:
        method.check_options(method_opts)
    for name in chain:
        get_refiner(name).check_options(chain_opts[name])
    overrides = validate.overrides(args.override)
    num_synthetic = synthetic_count(args.calib)
    if num_synthetic is not None and args.num_calib is not None:
        raise VitqError(f"--num-calib {args.num_calib} chooses among real images; with --calib {args.calib} give the "
                        "number of synthetic images there (synthetic:N)")
    synthetic = synthetic_settings(args, num_synthetic is not None)
    if args.init_state is not None:
        saved = validate.state_folder(args.init_state, "--init-state")
        scheme = Scheme.from_dict(saved["scheme"])
    else:
        validate.bits("--w-bits", args.w_bits, W_BITS)
        validate.bits("--a-bits", args.a_bits, A_BITS)
        validate.bits("--attn-bits", args.attn_bits, A_BITS)
        validate.quantizer_kind("--softmax-quantizer", args.softmax_quantizer)
        w_bits = DEFAULT_W_BITS if args.w_bits is None else args.w_bits
        a_bits = DEFAULT_A_BITS if args.a_bits is None else args.a_bits
        scheme = Scheme(args.scheme or "fq", w_bits, a_bits, attn_bits=args.attn_bits,
                        softmax_quantizer=args.softmax_quantizer, attn_granularity=args.attn_granularity or "tensor",
                        overrides=overrides, gelu_quantizer=args.gelu_quantizer, target=args.target,
                        keep_float=keep_float_groups(args.keep_float))
        method.adjust(scheme, method_opts)  # e.g. a method defined for the other regime
    device = resolve_device(args.device)
    validate.weights_file(args.weights)
    kwargs = validate.model_args(args.model_args)
    class_map = read_labels(args)
    calib_records = []
    if num_synthetic is None:
        calib_records = validate.image_records("--calib", args.calib, args.num_calib, "--num-calib", args.seed)
    val_records = None
    if args.val is not None:
        val_records = validate.image_records("--val", args.val, args.num_val, "--num-val", args.seed, args.labels,
                                             class_map)
    elif args.num_val is not None:
        raise VitqError(f"--num-val {args.num_val} needs --val DIR (no evaluation images were given)")
    ckpts = {}  # refiner -> its resumable checkpoint file
    for name, refine_opts in chain_opts.items():
        if "checkpoint_path" in get_refiner(name).config.field_names():
            ckpt = refine_opts.get("checkpoint_path")
            if ckpt is None:
                ckpt = refine_opts["checkpoint_path"] = checkpoint_default(out.path, name)
            validate.checkpoint_file(ckpt, f"--{name}-checkpoint-path")
            ckpts[name] = ckpt
        if refine_opts.get("select_on_val") and args.val is None:
            raise VitqError(f"--{name}-select-on-val needs --val DIR (labelled validation images)")

    # ---- the model (cheap), then the checks that need it
    torch.manual_seed(args.seed)
    model, weights_sha = build_model(args, kwargs)
    if overrides:
        validate.overrides_match(model, overrides, args.override)
    check_class_map(model, class_map, args)
    transform, transform_desc = model_transform(model)
    size = input_size(transform_desc)
    calib, calib_skipped = args.calib, []  # synthetic:N is made by api.quantize
    if num_synthetic is None:
        log.info("calibration: %d images from %s", len(calib_records), args.calib)
        images, _, calib_skipped = load_images(calib_records, transform, args.batch_size, args.num_workers,
                                               progress, "calibration", size)
        calib = CalibData(images, batch_size=args.batch_size, device=device, progress=progress, seed=args.seed)
    if synthetic is not None:
        synthetic["transform"] = transform_desc

    val_batches = None
    if any(o.get("select_on_val") for o in chain_opts.values()):
        # the release's selection on labelled validation images: only on explicit request, and recorded
        vx, vy, _ = load_images(val_records, transform, args.batch_size, args.num_workers, progress, "validation",
                                size)
        val_batches = [(vx[i:i + args.batch_size], vy[i:i + args.batch_size])
                       for i in range(0, len(vx), args.batch_size)]
    for name, ckpt in ckpts.items():
        state = "resuming from" if os.path.exists(ckpt) else "resumable checkpoint:"
        log.info("%s: %s %s (a rerun of the same command continues from it)", name, state, ckpt)
    start, cal_info = None, None
    if args.init_state is not None:
        start = load(model, args.init_state).to(device)
        cal_info = {"init_state": os.path.abspath(args.init_state), "method": saved.get("method")}
    t0 = time.perf_counter()
    try:
        qmodel, run = api.quantize(
            model, calib, None if start is not None else scheme, None if start is not None else args.method,
            rounding=args.weight_rounding or "nearest",  # None: neither the flag nor a recipe set it
            refine=chain or None, options=None if start is not None else method_opts,
            refine_options={n: o for n, o in chain_opts.items() if o}, seed=args.seed, start=start,
            val_batches=val_batches, augment_synthetic=args.augment_synthetic or None, synthetic=synthetic,
            batch_size=args.batch_size, device=device, progress=progress, search=search,
            search_options=search_options)
    except KeyboardInterrupt:
        for name, ckpt in ckpts.items():
            if os.path.exists(ckpt):
                log.warning("interrupted: the resumable %s checkpoint %s was kept; rerun the same command to "
                            "continue from it", name, ckpt)
        raise
    scheme = qmodel.vitq_scheme
    cal_info = cal_info or run["calibration"]
    round_info, ref_info = run["weight_rounding"], run["refinement"]
    search_s = run["search"]["seconds"] if run["search"] else 0.0
    refine_s = ref_info["seconds"] if ref_info else 0.0
    synth_s = (run["calib_source"].get("synthetic") or {}).get("seconds", 0.0)
    calibrate_s = time.perf_counter() - t0 - refine_s - round_info.get("seconds", 0.0) - synth_s - search_s
    log.info("calibrated in %.1f s", calibrate_s)
    if round_info["weight_rounding"] != "nearest":
        log.info("weights rounded (%s) in %.1f s", round_info["weight_rounding"], round_info["seconds"])
    if ref_info:
        log.info("refined in %.1f s", refine_s)

    results = {
        "model": args.model, "model_args": kwargs, "weights": os.path.abspath(args.weights) if args.weights else None,
        "weights_sha256": weights_sha, "scheme": scheme.name, "scheme_config": scheme.to_dict(),
        "method": cal_info.get("method") if args.init_state else args.method, "refine": args.refine,
        "w_bits": scheme.w_bits, "a_bits": scheme.a_bits, "seed": args.seed, "device": str(device),
        "threads": args.threads, "calib_dir": None if num_synthetic else os.path.abspath(args.calib),
        "calib_files": [os.path.relpath(r.path, args.calib) for r in calib_records],
        "calib_skipped": calib_skipped, "num_calib": run["num_calib"], "calib_source": run["calib_source"],
        "transform": transform_desc, "versions": versions(), "command": ["vitq", *args.argv],
        "calibration": cal_info, "weight_rounding": round_info, "refinement": ref_info, "recipe": recipe_info,
        "target_report": getattr(qmodel, "vitq_target_report", None), "search": run["search"], "float": None,
        "quant": None,
    }
    eval_s = 0.0
    if val_records is not None:
        metrics, val_skipped, eval_s = evaluate_on(qmodel, model, val_records, args, device, progress, size)
        results.update({"val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"],
                        "labels": args.labels, "class_map": os.path.abspath(args.class_map) if class_map else None,
                        "val_skipped": val_skipped, "float": metrics["float"], "quant": metrics["quant"]})
    results["timings"] = {"calibrate_s": calibrate_s, "refine_s": refine_s, "eval_s": eval_s}
    if run["search"]:
        results["timings"]["search_s"] = search_s
    if run["calib_source"]["num_synthetic"]:
        results["timings"]["synthesize_s"] = synth_s

    with out:
        save(qmodel.cpu(), out.tmp, model=args.model, model_args=kwargs, weights_sha256=weights_sha,
             method=results["method"], refine=args.refine)
        if run["search"]:
            from vitq.search.report import plot

            if plot(run["search"], out.file("hago_pareto.png")):
                run["search"]["plot"] = "hago_pareto.png"
        write_json(out.file("results.json"), results)
        out.commit()
    for name, ckpt in ckpts.items():
        if os.path.exists(ckpt):
            os.remove(ckpt)  # the finished run is in the state; a given path too: it could only resume a done run
            log.info("removed the %s checkpoint %s (it finished)", name, ckpt)
    if run["search"]:
        from vitq.search.report import text

        print(text(run["search"]))
    print(summary_line(results))
    print(f"wrote {out.path}/results.json, quant_state.safetensors, config.json")
    return 0


def keep_float_groups(text: str | None) -> tuple[str, ...]:
    """``--keep-float a,b`` as a tuple of group names (checked by the Scheme)."""
    if text is None:
        return ()
    if isinstance(text, (tuple, list)):
        return tuple(text)
    return tuple(g.strip() for g in text.split(",") if g.strip())


def apply_recipe(args) -> dict:
    """Fill the unset arguments of ``vitq quantize`` from ``args.recipe``; returns what goes into results.json."""
    if args.init_state is not None:
        raise VitqError(f"--recipe {args.recipe} chooses a method; it cannot start from --init-state")
    dests = set(vars(args))
    scheme = args.scheme if args.scheme or args.target not in (None, "none") else "fq"
    w_bits = DEFAULT_W_BITS if args.w_bits is None else args.w_bits
    a_bits = DEFAULT_A_BITS if args.a_bits is None else args.a_bits
    recipe, why = choose(args.recipe, scheme, w_bits, a_bits, dests, target=args.target)
    applied, overridden = {}, {}
    if args.scheme is None:
        args.scheme = applied["scheme"] = recipe.scheme
    for dest, value in recipe.settings(args.device).items():
        if dest == "keep_float" and args.search is not None and args.keep_float is None:
            applied["keep_float_left_to_search"] = value
            continue
        if getattr(args, dest) is None:
            setattr(args, dest, value)
            applied[dest] = value
        else:
            overridden[dest] = getattr(args, dest)
    log.info("recipe %s (%s): %s", recipe.name, why, " ".join(recipe.as_flags(args.device)))
    return {"name": recipe.name, "asked": args.recipe, "why": why, "applied": applied,
            "overridden_by_flags": overridden, "measured": MEASURED.get((recipe.name, w_bits, a_bits))}
