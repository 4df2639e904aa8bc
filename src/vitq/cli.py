"""The ``vitq`` command line: quantize, evaluate, demo, methods (and subcommands added by method modules).

Bad input ends with one line on stderr naming the input and what was expected, exit status 2, and no partial
output: results are written into a temporary folder beside ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.state import OutputDir, check_output_parent, make_parents

log = logging.getLogger("vitq")

# modules that add subcommands: each defines add_command(subparsers)
COMMAND_MODULES: tuple[str, ...] = ("vitq.landscape", "vitq.allocation", "vitq.export")


# ----------------------------------------------------------------------------------------------- helpers
def versions() -> dict:
    import numpy
    import timm

    import vitq

    return {"vitq": vitq.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise VitqError("--device cuda was asked for but no CUDA device is available (expected --device cpu)")
    if name not in ("cpu", "cuda"):
        raise VitqError(f"--device {name!r} is not supported (expected cpu or cuda)")
    return torch.device(name)


def load_images(records, transform, batch_size: int, num_workers: int, progress: bool, what: str):
    """Decode and preprocess records into one tensor; returns (images, labels, skipped paths)."""
    from tqdm.auto import tqdm

    from vitq.data import make_loader

    loader = make_loader(records, transform, batch_size=batch_size, num_workers=num_workers)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"load {what}", disable=not progress, leave=False, dynamic_ncols=True):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise VitqError(f"none of the {len(records)} {what} images could be read ({', '.join(loader.skipped[:3])} ...)")
    if loader.skipped:
        log.warning("skipped %d unreadable %s images (e.g. %s)", len(loader.skipped), what, loader.skipped[0])
    return torch.cat(xs), torch.cat(ys), list(loader.skipped)


def image_set(folder: str, num: int | None, seed: int, labels: str, what: str):
    from vitq.data import scan_image_folder, select_records

    records = select_records(scan_image_folder(folder, labels=labels), num, seed)
    log.info("%s: %d images from %s", what, len(records), folder)
    return records


def model_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise VitqError(f"--model-args {text!r} is not a JSON object (expected e.g. '{{\"num_classes\": 10}}')")
    return value


def build_model(args, kwargs: dict) -> tuple[torch.nn.Module, str | None]:
    from vitq.models import create_model, sha256_file

    model = create_model(args.model, weights=args.weights, pretrained=args.weights is None, **kwargs)
    return model, (sha256_file(args.weights) if args.weights else None)


def evaluate_on(qmodel, model, args, device, progress: bool) -> tuple[dict, list[str], float]:
    from vitq.data import make_loader, model_transform
    from vitq.evaluate import evaluate

    transform, _ = model_transform(model)
    records = image_set(args.val, args.num_val, args.seed, args.labels, "evaluation")
    loader = make_loader(records, transform, batch_size=args.batch_size, num_workers=args.num_workers)
    t0 = time.perf_counter()
    metrics = evaluate(qmodel, model.to(device), loader, device=device, progress=progress, total=len(loader))
    if metrics["num_images"] == 0:
        raise VitqError(f"none of the evaluation images in {args.val} could be read")
    return metrics, list(loader.skipped), time.perf_counter() - t0


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def summary_line(results: dict) -> str:
    f, q = results.get("float"), results.get("quant")
    if not f or not q:
        return "no --val given: nothing evaluated"
    return (f"float top-1 {f['top1']:.2f}  quant top-1 {q['top1']:.2f}  (top-5 {f['top5']:.2f} / {q['top5']:.2f})  "
            f"agreement {q['agreement']:.2f} %  KL {q['kl']:.4f}  on {results['num_val']} images")


# ----------------------------------------------------------------------------------------------- commands
def cmd_quantize(args) -> int:
    from vitq import api
    from vitq.calib import CalibData
    from vitq.data import model_transform
    from vitq.registry import get_method, get_refiner
    from vitq.scheme import Override, Scheme
    from vitq.state import load, read_config, save, write_json

    progress = not args.quiet
    out = OutputDir(args.out, args.overwrite)
    if args.init_state is None and args.method is None:
        raise VitqError("--method is required (or --init-state DIR to start from a saved state)")
    scheme_flags = {"--method": args.method, "--scheme": args.scheme, "--w-bits": args.w_bits,
                    "--a-bits": args.a_bits, "--attn-bits": args.attn_bits,
                    "--softmax-quantizer": args.softmax_quantizer, "--attn-granularity": args.attn_granularity,
                    "--override": args.override or None}
    if args.init_state is not None and any(v is not None for v in scheme_flags.values()):
        given = ", ".join(k for k, v in scheme_flags.items() if v is not None)
        raise VitqError(f"--init-state {args.init_state} brings its own scheme and calibration; {given} would be "
                        "ignored (drop them, or calibrate anew without --init-state)")
    method = get_method(args.method) if args.init_state is None else None
    refiner = get_refiner(args.refine) if args.refine else None
    method_opts = method.options_from_args(args) if method else {}
    refine_opts = refiner.options_from_args(args) if refiner else {}
    if args.init_state is not None:
        saved = read_config(args.init_state)
        scheme = Scheme.from_dict(saved["scheme"])
    else:
        w_bits = 8 if args.w_bits is None else args.w_bits
        a_bits = 8 if args.a_bits is None else args.a_bits
        scheme = Scheme(args.scheme or "fq", w_bits, a_bits, attn_bits=args.attn_bits,
                        softmax_quantizer=args.softmax_quantizer, attn_granularity=args.attn_granularity or "tensor",
                        overrides=tuple(Override.parse(o) for o in args.override))
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    kwargs = model_args(args.model_args)
    model, weights_sha = build_model(args, kwargs)
    transform, transform_desc = model_transform(model)
    calib_records = image_set(args.calib, args.num_calib, args.seed, args.labels, "calibration")
    images, _, calib_skipped = load_images(calib_records, transform, args.batch_size, args.num_workers, progress,
                                           "calibration")
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

    ref_info, refine_s, ckpt = None, 0.0, None
    if refiner is not None:
        if refine_opts.get("select_on_val"):
            # the release's selection on labelled validation images: only on explicit request, and recorded
            if args.val is None:
                raise VitqError(f"--{args.refine}-select-on-val needs --val DIR (labelled validation images)")
            val_records = image_set(args.val, args.num_val, args.seed, args.labels, "validation (selection)")
            vx, vy, _ = load_images(val_records, transform, args.batch_size, args.num_workers, progress, "validation")
            refine_opts["val_batches"] = [(vx[i:i + args.batch_size], vy[i:i + args.batch_size])
                                          for i in range(0, len(vx), args.batch_size)]
        if _accepts(refiner.fn, "checkpoint_path"):
            ckpt = os.path.join(os.path.dirname(out.path), f".{os.path.basename(out.path)}.{args.refine}-ckpt")
            refine_opts.setdefault("checkpoint_path", ckpt)
        t0 = time.perf_counter()
        ref_info = api.refine(qmodel, model, calib, args.refine, **refine_opts)
        refine_s = time.perf_counter() - t0
        log.info("refined in %.1f s", refine_s)

    results = {
        "model": args.model, "model_args": kwargs, "weights": os.path.abspath(args.weights) if args.weights else None,
        "weights_sha256": weights_sha, "scheme": scheme.name, "scheme_config": scheme.to_dict(),
        "method": cal_info.get("method") if args.init_state else args.method, "refine": args.refine,
        "w_bits": scheme.w_bits, "a_bits": scheme.a_bits, "seed": args.seed, "device": str(device),
        "calib_dir": os.path.abspath(args.calib),
        "calib_files": [os.path.relpath(r.path, args.calib) for r in calib_records],
        "calib_skipped": calib_skipped, "num_calib": int(images.shape[0]),
        "transform": transform_desc, "versions": versions(), "command": ["vitq", *sys.argv[1:]],
        "calibration": cal_info, "refinement": ref_info, "float": None, "quant": None,
    }
    eval_s = 0.0
    if args.val is not None:
        metrics, val_skipped, eval_s = evaluate_on(qmodel, model, args, device, progress)
        results.update({"val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"],
                        "val_skipped": val_skipped, "float": metrics["float"], "quant": metrics["quant"]})
    results["timings"] = {"calibrate_s": calibrate_s, "refine_s": refine_s, "eval_s": eval_s}

    with out:
        save(qmodel.cpu(), out.tmp, model=args.model, model_args=kwargs, weights_sha256=weights_sha,
             method=results["method"], refine=args.refine)
        write_json(out.file("results.json"), results)
        out.commit()
    if ckpt and os.path.exists(ckpt):
        os.remove(ckpt)
    print(summary_line(results))
    print(f"wrote {out.path}/results.json, quant_state.safetensors, config.json")
    return 0


def cmd_evaluate(args) -> int:
    from vitq.state import load, read_config, write_json

    progress = not args.quiet
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise VitqError(f"output file {args.out} already exists (expected a new path, or pass --overwrite)")
    check_output_parent(out)
    saved = read_config(args.state)
    if saved.get("model") not in (None, args.model):
        raise VitqError(f"state {args.state} was made for model {saved['model']}, not {args.model}")
    device = resolve_device(args.device)
    kwargs = model_args(args.model_args) if args.model_args is not None else saved.get("model_args", {})
    model, weights_sha = build_model(args, kwargs)
    if saved.get("weights_sha256") and weights_sha and saved["weights_sha256"] != weights_sha:
        log.warning("weights file differs from the one the state was calibrated with (sha256 mismatch)")
    qmodel = load(model, args.state).to(device)
    metrics, skipped, eval_s = evaluate_on(qmodel, model, args, device, progress)
    results = {"model": args.model, "weights_sha256": weights_sha, "state": os.path.abspath(args.state),
               "scheme": saved["scheme"]["name"], "method": saved.get("method"), "refine": saved.get("refine"),
               "w_bits": saved["scheme"]["w_bits"], "a_bits": saved["scheme"]["a_bits"], "seed": args.seed,
               "val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"], "val_skipped": skipped,
               "float": metrics["float"], "quant": metrics["quant"], "timings": {"eval_s": eval_s},
               "versions": versions(), "command": ["vitq", *sys.argv[1:]]}
    make_parents(out)
    write_json(out, results)
    print(summary_line(results))
    print(f"wrote {out}")
    return 0


def cmd_methods(args) -> int:
    from vitq.quantizers import QUANTIZER_KINDS
    from vitq.registry import METHODS, REFINERS, load_builtin
    from vitq.scheme import SCHEMES

    load_builtin()
    for title, table in (("schemes", SCHEMES), ("methods", {k: v.description for k, v in METHODS.items()}),
                         ("refiners", {k: v.description for k, v in REFINERS.items()}),
                         ("quantizer kinds", {k: (v.__doc__ or "").strip().split("\n")[0]
                                              for k, v in QUANTIZER_KINDS.items() if k != "base"})):
        print(f"{title}:")
        for name, desc in table.items():
            print(f"  {name:<12} {desc}")
    return 0


def cmd_demo(args) -> int:
    from vitq.demo import run_demo

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    return run_demo(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed,
                    progress=not args.quiet, methods=methods)


# ----------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
        p.add_argument("--weights", default=None, help="local weights file (.safetensors or .pth) with timm key names")
        p.add_argument("--model-args", default=None, metavar="JSON",
                       help="extra timm.create_model arguments, e.g. '{\"num_classes\": 10}' (evaluate: default "
                            "those the state was made with)")
    p.add_argument("--labels", choices=("wnid", "folder"), default="wnid",
                   help="class folders are ImageNet WordNet ids (default) or plain ImageFolder classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    from vitq import __version__
    from vitq.registry import METHODS, REFINERS, load_builtin

    load_builtin()
    p = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers.")
    p.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="calibrate (and optionally refine) a model, evaluate it, save its state")
    _common(q)
    q.add_argument("--calib", required=True, help="calibration image folder (one sub-folder per class)")
    q.add_argument("--num-calib", type=int, default=None, help="seeded choice of N calibration images (default all)")
    q.add_argument("--val", default=None, help="evaluation image folder")
    q.add_argument("--num-val", type=int, default=None, help="seeded choice of N evaluation images (default all)")
    q.add_argument("--scheme", choices=("fq", "matmul"), default=None, help="quantization regime (default fq)")
    q.add_argument("--w-bits", type=int, default=None, help="weight bits (default 8)")
    q.add_argument("--a-bits", type=int, default=None, help="activation bits (default 8)")
    q.add_argument("--attn-bits", type=int, default=None, help="softmax-output bits (default --a-bits)")
    q.add_argument("--softmax-quantizer", default=None, help="quantizer kind for softmax outputs (see vitq methods)")
    q.add_argument("--attn-granularity", choices=("tensor", "head"), default=None,
                   help="q/k/v quantizers: one scale per tensor (default) or per attention head")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN:wBaB",
                   help="bits for modules matching a name pattern, e.g. 'head:w8a8' (repeatable)")
    q.add_argument("--method", default=None, help="calibration method (see vitq methods)")
    q.add_argument("--refine", default=None, help="refiner to run after calibration (see vitq methods)")
    q.add_argument("--init-state", default=None, metavar="DIR",
                   help="start from a saved state (a previous --out) instead of calibrating")
    q.add_argument("--out", required=True,
                   help="output folder (must not exist unless --overwrite; missing parents are created)")
    for entries, title in ((METHODS, "method options"), (REFINERS, "refiner options")):
        group = q.add_argument_group(title)
        for entry in entries.values():
            if entry.add_arguments is not None:
                entry.add_arguments(group)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="reload a saved state (no recalibration) and evaluate it")
    _common(e)
    e.add_argument("--state", required=True, help="folder written by vitq quantize --out")
    e.add_argument("--val", required=True, help="evaluation image folder")
    e.add_argument("--num-val", type=int, default=None)
    e.add_argument("--out", required=True, help="results JSON file to write")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="train a small ViT on scikit-learn digits and compare every method (no network)")
    d.add_argument("--out", default="vitq-demo", help="folder for the table and results (default ./vitq-demo)")
    d.add_argument("--quick", action="store_true", help="fewer bit widths and a shorter training run")
    d.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list schemes, methods, refiners and quantizer kinds")
    m.set_defaults(func=cmd_methods)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="vitq: %(message)s", stream=sys.stderr, force=True)
    try:
        return int(args.func(args) or 0)
    except VitqError as e:
        print(f"vitq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
