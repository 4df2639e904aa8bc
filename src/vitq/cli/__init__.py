"""The ``vitq`` command line: quantize, evaluate, demo, methods (and subcommands added by method modules).

Bad input ends with one line on stderr naming the input and what was expected, exit status 2, and no partial
output: results are written into a temporary folder beside ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.state import OutputDir, make_parents, remove_created

log = logging.getLogger("vitq")

# modules that add subcommands: each defines add_command(subparsers)
COMMAND_MODULES: tuple[str, ...] = ("vitq.refine.landscape", "vitq.cli.allocation", "vitq.recipes",
                                     "vitq.cli.models", "vitq.export.onnx")


# ----------------------------------------------------------------------------------------------- helpers
def versions() -> dict:
    import numpy
    import timm

    from vitq._version import __version__

    return {"vitq": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise VitqError("--device cuda was asked for but no CUDA device is available (expected --device cpu)")
    if name not in ("cpu", "cuda"):
        raise VitqError(f"--device {name!r} is not supported (expected cpu or cuda)")
    return torch.device(name)


def input_size(desc: dict) -> tuple[int, int]:
    return int(desc["input_size"][1]), int(desc["input_size"][2])


def load_images(records, transform, batch_size: int, num_workers: int, progress: bool, what: str,
                min_size: tuple[int, int] | None = None):
    """Decode and preprocess records into one tensor; returns (images, labels, skipped paths)."""
    from tqdm.auto import tqdm

    from vitq.data import make_loader, report_images

    loader = make_loader(records, transform, batch_size=batch_size, num_workers=num_workers, min_size=min_size)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"load {what}", disable=not progress, leave=False, dynamic_ncols=True):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise VitqError(f"none of the {len(records)} {what} images could be read ({', '.join(loader.skipped[:3])} ...)")
    report_images(loader, what, log)
    return torch.cat(xs), torch.cat(ys), list(loader.skipped)


def build_model(args, kwargs: dict) -> tuple[torch.nn.Module, str | None]:
    from vitq.models.loading import create_model, sha256_file

    model = create_model(args.model, weights=args.weights, pretrained=args.weights is None, **kwargs)
    return model, (sha256_file(args.weights) if args.weights else None)


def read_labels(args) -> dict | None:
    """--labels / --class-map: the class map (or None); refuses a class map without --labels folder."""
    from vitq.data import read_class_map

    if args.class_map is None:
        return None
    if args.labels != "folder":
        raise VitqError(f"--class-map {args.class_map} needs --labels folder (WordNet-id folders are mapped to "
                        "ImageNet indices already)")
    return read_class_map(args.class_map)


def labels_mean_classes(args) -> bool:
    """Whether the evaluation labels are class indices of the model's head (top-1 can be measured)."""
    return args.labels == "wnid" or args.class_map is not None


def check_class_map(model, class_map: dict | None, args) -> None:
    n = getattr(model, "num_classes", None)
    if class_map and isinstance(n, int):
        bad = {k: v for k, v in class_map.items() if v >= n}
        if bad:
            k, v = next(iter(bad.items()))
            raise VitqError(f"--class-map {args.class_map}: {k!r} maps to {v}, but the model has {n} classes "
                            f"(expected indices 0..{n - 1})")


def evaluate_on(qmodel, model, records, args, device, progress: bool, min_size) -> tuple[dict, list[str], float]:
    from vitq.data import make_loader, model_transform, report_images
    from vitq.evaluate import evaluate

    transform, _ = model_transform(model)
    loader = make_loader(records, transform, batch_size=args.batch_size, num_workers=args.num_workers,
                         min_size=min_size)
    t0 = time.perf_counter()
    metrics = evaluate(qmodel, model.to(device), loader, device=device, progress=progress, total=len(loader))
    if metrics["num_images"] == 0:
        raise VitqError(f"--val {args.val}: none of the {len(records)} evaluation images could be read")
    report_images(loader, "evaluation", log)
    if not labels_mean_classes(args):  # folder positions are not the head's classes: no accuracy
        for side in ("float", "quant"):
            metrics[side]["top1"] = metrics[side]["top5"] = None
    return metrics, list(loader.skipped), time.perf_counter() - t0


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summary_line(results: dict) -> str:
    f, q = results.get("float"), results.get("quant")
    if not f or not q:
        return "no --val given: nothing evaluated"
    line = (f"float top-1 {_pct(f['top1'])}  quant top-1 {_pct(q['top1'])}  (top-5 {_pct(f['top5'])} / "
            f"{_pct(q['top5'])})  agreement {q['agreement']:.2f} %  KL {q['kl']:.4f}  on {results['num_val']} images")
    if q["top1"] is None:
        line += "\n(top-1 not available: --labels folder numbers the class folders, which are not the model's " \
                "classes; pass --class-map FILE to map them)"
    return line


def checkpoint_default(out_path: str, refiner: str) -> str:
    """Where a refiner's resumable checkpoint goes by default: a visible file beside the output folder."""
    return f"{out_path}.{refiner}-ckpt"


# ----------------------------------------------------------------------------------------------- commands
def cmd_quantize(args) -> int:
    from vitq import api
    from vitq.calib import CalibData
    from vitq.cli import validate
    from vitq.data import model_transform
    from vitq.registry import get_method, get_refiner
    from vitq.scheme import A_BITS, W_BITS, Scheme
    from vitq.state import load, save, write_json

    progress = not args.quiet
    # ---- every check that needs no model, before the model is loaded
    out = OutputDir(args.out, args.overwrite)
    recipe_info = None
    if args.recipe is not None:
        from vitq.recipes import apply_recipe

        recipe_info = apply_recipe(args)  # fills only the flags left unset
    if args.init_state is None and args.method is None:
        raise VitqError("--method is required (or --init-state DIR to start from a saved state)")
    scheme_flags = {"--method": args.method, "--scheme": args.scheme, "--w-bits": args.w_bits,
                    "--a-bits": args.a_bits, "--attn-bits": args.attn_bits,
                    "--softmax-quantizer": args.softmax_quantizer, "--attn-granularity": args.attn_granularity,
                    "--override": args.override or None, "--gelu-quantizer": args.gelu_quantizer}
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
    method_opts = method.options_from_args(args) if method else {}
    chain_opts = {name: get_refiner(name).options_from_args(args) for name in chain}
    if method:
        method.check_options(method_opts)
    for name in chain:
        get_refiner(name).check_options(chain_opts[name])
    overrides = validate.overrides(args.override)
    if args.init_state is not None:
        saved = validate.state_folder(args.init_state, "--init-state")
        scheme = Scheme.from_dict(saved["scheme"])
    else:
        validate.bits("--w-bits", args.w_bits, W_BITS)
        validate.bits("--a-bits", args.a_bits, A_BITS)
        validate.bits("--attn-bits", args.attn_bits, A_BITS)
        validate.quantizer_kind("--softmax-quantizer", args.softmax_quantizer)
        w_bits = 8 if args.w_bits is None else args.w_bits
        a_bits = 8 if args.a_bits is None else args.a_bits
        scheme = Scheme(args.scheme or "fq", w_bits, a_bits, attn_bits=args.attn_bits,
                        softmax_quantizer=args.softmax_quantizer, attn_granularity=args.attn_granularity or "tensor",
                        overrides=overrides, gelu_quantizer=args.gelu_quantizer)
        method.adjust(scheme, method_opts)  # e.g. a method defined for the other regime
    device = resolve_device(args.device)
    validate.weights_file(args.weights)
    kwargs = validate.model_args(args.model_args)
    class_map = read_labels(args)
    calib_records = validate.image_records("--calib", args.calib, args.num_calib, "--num-calib", args.seed)
    val_records = None
    if args.val is not None:
        val_records = validate.image_records("--val", args.val, args.num_val, "--num-val", args.seed, args.labels,
                                             class_map)
    elif args.num_val is not None:
        raise VitqError(f"--num-val {args.num_val} needs --val DIR (no evaluation images were given)")
    ckpts = {}  # refiner -> its resumable checkpoint file
    for name, refine_opts in chain_opts.items():
        if _accepts(get_refiner(name).fn, "checkpoint_path"):
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
    log.info("calibration: %d images from %s", len(calib_records), args.calib)
    images, _, calib_skipped = load_images(calib_records, transform, args.batch_size, args.num_workers, progress,
                                           "calibration", size)
    calib = CalibData(images, batch_size=args.batch_size, device=device, progress=progress, seed=args.seed)

    t0 = time.perf_counter()
    if args.init_state is not None:
        qmodel = load(model, args.init_state).to(device)
        cal_info = {"init_state": os.path.abspath(args.init_state), "method": saved.get("method")}
    else:
        qmodel = api.prepare(model, scheme, method=args.method, options=method_opts)
        scheme = qmodel.vitq_scheme
        cal_info = api.calibrate(qmodel, calib, args.method, **method_opts)
    calibrate_s = time.perf_counter() - t0
    log.info("calibrated in %.1f s", calibrate_s)
    args.weight_rounding = args.weight_rounding or "nearest"  # None: neither the flag nor a recipe set it
    round_info = api.round_weights(qmodel, calib, how=args.weight_rounding)
    if args.weight_rounding != "nearest":
        log.info("weights rounded (%s) in %.1f s", args.weight_rounding, round_info["seconds"])

    ref_info, refine_s = None, 0.0
    if chain:
        for refine_opts in chain_opts.values():
            if refine_opts.get("select_on_val"):
                # the release's selection on labelled validation images: only on explicit request, and recorded
                vx, vy, _ = load_images(val_records, transform, args.batch_size, args.num_workers, progress,
                                        "validation", size)
                refine_opts["val_batches"] = [(vx[i:i + args.batch_size], vy[i:i + args.batch_size])
                                              for i in range(0, len(vx), args.batch_size)]
        for name, ckpt in ckpts.items():
            state = "resuming from" if os.path.exists(ckpt) else "resumable checkpoint:"
            log.info("%s: %s %s (a rerun of the same command continues from it)", name, state, ckpt)
        t0 = time.perf_counter()
        try:
            ref_info = api.refine(qmodel, model, calib, chain,
                                  **(chain_opts if len(chain) > 1 else chain_opts[chain[0]]))
        except KeyboardInterrupt:
            for name, ckpt in ckpts.items():
                if os.path.exists(ckpt):
                    log.warning("interrupted: the resumable %s checkpoint %s was kept; rerun the same command to "
                                "continue from it", name, ckpt)
            raise
        refine_s = time.perf_counter() - t0
        log.info("refined in %.1f s", refine_s)

    results = {
        "model": args.model, "model_args": kwargs, "weights": os.path.abspath(args.weights) if args.weights else None,
        "weights_sha256": weights_sha, "scheme": scheme.name, "scheme_config": scheme.to_dict(),
        "method": cal_info.get("method") if args.init_state else args.method, "refine": args.refine,
        "w_bits": scheme.w_bits, "a_bits": scheme.a_bits, "seed": args.seed, "device": str(device),
        "threads": args.threads, "calib_dir": os.path.abspath(args.calib),
        "calib_files": [os.path.relpath(r.path, args.calib) for r in calib_records],
        "calib_skipped": calib_skipped, "num_calib": int(images.shape[0]),
        "transform": transform_desc, "versions": versions(), "command": ["vitq", *args.argv],
        "calibration": cal_info, "weight_rounding": round_info, "refinement": ref_info, "recipe": recipe_info,
        "float": None, "quant": None,
    }
    eval_s = 0.0
    if val_records is not None:
        metrics, val_skipped, eval_s = evaluate_on(qmodel, model, val_records, args, device, progress, size)
        results.update({"val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"],
                        "labels": args.labels, "class_map": os.path.abspath(args.class_map) if class_map else None,
                        "val_skipped": val_skipped, "float": metrics["float"], "quant": metrics["quant"]})
    results["timings"] = {"calibrate_s": calibrate_s, "refine_s": refine_s, "eval_s": eval_s}

    with out:
        save(qmodel.cpu(), out.tmp, model=args.model, model_args=kwargs, weights_sha256=weights_sha,
             method=results["method"], refine=args.refine)
        write_json(out.file("results.json"), results)
        out.commit()
    for name, ckpt in ckpts.items():
        if os.path.exists(ckpt):
            os.remove(ckpt)  # the finished run is in the state; a given path too: it could only resume a done run
            log.info("removed the %s checkpoint %s (it finished)", name, ckpt)
    print(summary_line(results))
    print(f"wrote {out.path}/results.json, quant_state.safetensors, config.json")
    return 0


def cmd_evaluate(args) -> int:
    from vitq.cli import validate
    from vitq.data import model_transform
    from vitq.state import check_output_file, load, write_json

    progress = not args.quiet
    out = os.path.abspath(args.out)
    check_output_file(args.out, args.overwrite)
    validate.positive("--batch-size", args.batch_size)
    validate.positive("--num-val", args.num_val)
    validate.non_negative("--num-workers", args.num_workers)
    saved = validate.state_folder(args.state)
    if saved.get("model") not in (None, args.model):
        raise VitqError(f"--state {args.state} was made for model {saved['model']}, not --model {args.model}")
    device = resolve_device(args.device)
    validate.weights_file(args.weights)
    kwargs = validate.model_args(args.model_args) if args.model_args is not None else saved.get("model_args", {})
    class_map = read_labels(args)
    records = validate.image_records("--val", args.val, args.num_val, "--num-val", args.seed, args.labels, class_map)
    model, weights_sha = build_model(args, kwargs)
    check_class_map(model, class_map, args)
    if saved.get("weights_sha256") and weights_sha and saved["weights_sha256"] != weights_sha:
        log.warning("--weights %s differs from the weights the state was calibrated with (sha256 mismatch)",
                    args.weights)
    qmodel = load(model, args.state).to(device)
    _, desc = model_transform(model)
    metrics, skipped, eval_s = evaluate_on(qmodel, model, records, args, device, progress, input_size(desc))
    results = {"model": args.model, "weights_sha256": weights_sha, "state": os.path.abspath(args.state),
               "scheme": saved["scheme"]["name"], "method": saved.get("method"), "refine": saved.get("refine"),
               "w_bits": saved["scheme"]["w_bits"], "a_bits": saved["scheme"]["a_bits"], "seed": args.seed,
               "threads": args.threads, "val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"],
               "labels": args.labels, "class_map": os.path.abspath(args.class_map) if class_map else None,
               "val_skipped": skipped, "float": metrics["float"], "quant": metrics["quant"],
               "timings": {"eval_s": eval_s}, "versions": versions(), "command": ["vitq", *args.argv]}
    created = make_parents(out)
    try:
        write_json(out, results)
    except BaseException:
        remove_created(created)
        raise
    print(summary_line(results))
    print(f"wrote {out}")
    return 0


def first_sentence(text: str) -> str:
    """The whole first sentence of a docstring or description (joined over line breaks)."""
    flat = " ".join((text or "").split())
    for end in (". ", ".\n"):
        if end in flat:
            return flat[:flat.index(end) + 1]
    return flat


def cmd_methods(args) -> int:
    import textwrap

    from vitq.quant.base import QUANTIZER_KINDS
    from vitq.refine.gptq import ROUNDINGS
    from vitq.registry import METHODS, REFINERS
    from vitq.scheme import SCHEMES
    width = 110

    def show(name: str, desc: str, time_note: str = "") -> None:
        lines = textwrap.wrap(desc, width - 16) or [""]
        print(f"  {name:<13} {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<13} {line}")
        for line in textwrap.wrap(f"time: {time_note}", width - 18) if time_note else []:
            print(f"  {'':<15} {line}")

    print("schemes:")
    for name, desc in SCHEMES.items():
        show(name, desc)
    print("weight rounding (--weight-rounding, after --method):")
    for name, desc in ROUNDINGS.items():
        show(name, desc)
    for title, table in (("methods (--method)", METHODS), ("refiners (--refine)", REFINERS)):
        print(f"{title}:")
        for name, entry in table.items():
            show(name, entry.description, entry.expected_time or "not documented by the method")
    print("quantizer kinds (--softmax-quantizer):")
    for name, kind in QUANTIZER_KINDS.items():
        if name != "base":
            show(name, first_sentence(kind.__doc__ or ""))
    print("\nTimes are measured on this project's 2-core CPU (BENCHMARKS.md) unless they say otherwise; a shared "
          "or busier machine is slower.\nOptions of one method: vitq quantize --method NAME --help")
    return 0


def cmd_demo(args) -> int:
    from vitq.demo import run_demo

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    return run_demo(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed,
                    progress=not args.quiet, methods=methods, threads=args.threads)


# ----------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    from vitq.cli.validate import add_threads_flag

    if model:
        p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224, or hf:DIR (a "
                       "Hugging Face ViT/DeiT save_pretrained folder); see vitq models")
        p.add_argument("--weights", default=None, help="local weights file (.safetensors or .pth) with timm key names")
        p.add_argument("--model-args", default=None, metavar="JSON",
                       help="extra timm.create_model arguments, e.g. '{\"num_classes\": 10}' (evaluate: default "
                            "those the state was made with)")
    p.add_argument("--labels", choices=("wnid", "folder"), default="wnid",
                   help="evaluation class folders are ImageNet WordNet ids (default: top-1 measured) or any names "
                        "(folder: agreement and KL only, unless --class-map maps them)")
    p.add_argument("--class-map", default=None, metavar="FILE",
                   help="with --labels folder: JSON {folder name: class index of the model} to measure top-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    add_threads_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that vitq wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


class _EntryOptions:
    """What a method's ``add_arguments`` is given: adds to the parser (hidden from --help unless this method
    was chosen) and records which entry owns each flag, so a flag of another method is refused."""

    def __init__(self, target, kind: str, name: str, hidden: bool, owners: dict):
        self.target, self.kind, self.name, self.hidden, self.owners = target, kind, name, hidden, owners

    def add_argument(self, *a, **kw):
        if self.hidden:
            kw["help"] = argparse.SUPPRESS
        action = self.target.add_argument(*a, **kw)
        self.owners[action.dest] = (self.kind, self.name, action.option_strings[0])
        return action

    def __getattr__(self, attr):
        return getattr(self.target, attr)


def _given(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in argv (``--flag X`` or ``--flag=X``), for choosing what --help shows."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    from vitq._version import __version__
    from vitq.cli.validate import add_threads_flag
    from vitq.registry import METHODS, REFINERS
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers.")
    p.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="calibrate (and optionally refine) a model, evaluate it, save its state",
                       epilog="Each method and refiner has its own options: vitq quantize --method NAME --help "
                              "(or --refine NAME --help) lists them; vitq methods lists the names.")
    _common(q)
    q.add_argument("--calib", required=True, help="calibration image folder (sub-folders of images; names unused)")
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
    owners: dict = {}
    shown = {"method": _given(argv, "--method"), "refiner": _given(argv, "--refine")}
    for kind, entries in (("method", METHODS), ("refiner", REFINERS)):
        for entry in entries.values():
            if not entry.has_options:
                continue
            visible = shown[kind] == entry.name
            target = q.add_argument_group(f"options of {kind} {entry.name}") if visible else q
            entry.add_arguments(_EntryOptions(target, kind, entry.name, not visible, owners))
    q.set_defaults(func=cmd_quantize, option_owners=owners)

    e = sub.add_parser("evaluate", help="reload a saved state (no recalibration) and evaluate it")
    _common(e)
    e.add_argument("--state", required=True, help="folder written by vitq quantize --out")
    e.add_argument("--val", required=True, help="evaluation image folder")
    e.add_argument("--num-val", type=int, default=None)
    e.add_argument("--out", required=True, help="results JSON file to write")
    e.set_defaults(func=cmd_evaluate)

    from vitq.demo import default_demo_dir

    d = sub.add_parser("demo", help="train a small ViT on scikit-learn digits and compare every method (no network)")
    d.add_argument("--out", default=None,
                   help=f"folder for the table, plot and results (default {default_demo_dir()}, outside the "
                        "repository)")
    d.add_argument("--quick", action="store_true", help="fewer bit widths and a shorter training run")
    d.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    d.add_argument("--seed", type=int, default=0)
    add_threads_flag(d, 1, ": the demo model is too small to gain from more, and a shared CPU loses a lot "
                           "with more threads than free cores")
    d.add_argument("--overwrite", action="store_true", help="replace an existing folder vitq wrote")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list schemes, methods (with expected times), refiners and quantizer kinds")
    m.set_defaults(func=cmd_methods)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from vitq.cli.validate import set_threads

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="vitq: %(message)s", stream=sys.stderr, force=True)
    try:
        if hasattr(args, "threads"):
            args.threads = set_threads(args.threads)
        args.argv = argv
        return int(args.func(args) or 0)
    except VitqError as e:
        print(f"vitq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a permission changed during the run, ...: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"vitq: error: {where}{e.strerror or e} (expected a readable input and a writable output)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
