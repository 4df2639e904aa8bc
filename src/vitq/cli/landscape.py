"""``vitq landscape``: plot infoNCE and top-1 agreement over perturbed quantization scales of one block of a
saved state (the computation and the plot: :mod:`vitq.refine.landscape`)."""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
from torch import nn

from vitq.cli.validate import add_threads_flag, image_records, positive, state_folder, weights_file
from vitq.errors import VitqError

log = logging.getLogger("vitq")

DESCRIPTION = ("For a saved quantization state, the qkv and proj weight scales of one block are moved along one "
               "random direction (1-D) or two (2-D grid): s(a, b) = |s * (1 + a*u + b*v)| with u, v ~ N(0, 1) per "
               "scale, rescaled to RMS 1, so a is the relative (RMS) change of the scales. At each point the "
               "infoNCE loss and the top-1 agreement with the float model over the calibration images are "
               "measured (only the blocks from the perturbed one to the end run; the block's input is cached). "
               "Writes landscape.png and landscape.json.")


def load_images(folder: str, num: int | None, seed: int, model: nn.Module, batch_size: int,
                records=None) -> tuple[torch.Tensor, list[str]]:
    """The calibration images of ``folder`` (a seeded draw of ``num``) as the model's preprocessing makes them,
    and the paths of those that could be read."""
    from vitq.data import model_transform, read_images, report_images, scan_image_folder, select_records

    if records is None:
        records = select_records(scan_image_folder(folder, labels="folder"), num, seed)  # labels are not used
    transform, desc = model_transform(model)
    images, _, loader = read_images(records, transform, batch_size, min_size=tuple(desc["input_size"][1:]))
    if images is None:
        raise VitqError(f"--calib {folder}: none of the {len(records)} images could be read")
    report_images(loader, "landscape", log)
    skipped = set(loader.skipped)
    used = [r.path for r in records if r.path not in skipped]
    if num is not None and len(used) < num:
        log.warning("landscape uses %d images, fewer than --num-calib %d (%d in %s, %d unreadable)", len(used), num,
                    len(records), folder, len(skipped))
    return images, used


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "landscape", help="plot infoNCE and top-1 agreement over perturbed scales of one block",
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", default=None, help="local weights file (.safetensors or .pth)")
    p.add_argument("--state", required=True, help="folder of a saved quantization state (vitq quantize --out)")
    p.add_argument("--calib", required=True, help="image folder (class subfolders) for the loss")
    p.add_argument("--num-calib", type=int, default=64, help="images drawn (seeded) from --calib")
    p.add_argument("--block", default=None, help="block name (blocks.11) or index among the blocks; default last")
    p.add_argument("--dims", type=int, choices=(1, 2), default=1, help="random directions")
    p.add_argument("--steps", type=int, default=None, help="points per direction (default 21 for 1-D, 9 for 2-D)")
    p.add_argument("--radius", type=float, default=0.05, help="largest relative (RMS) scale change")
    p.add_argument("--temperature", type=float, default=3.0, help="infoNCE temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw and the directions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder (landscape.png, landscape.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that vitq wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitq.calib import CalibData
    from vitq.models.loading import create_model, sha256_file
    from vitq.refine.landscape import MAX_RADIUS, PNG_FILE, compute_landscape, write_outputs
    from vitq.state import OutputDir, load

    out_dir = OutputDir(args.out, args.overwrite, command="landscape")
    out = out_dir.path
    positive("--batch-size", args.batch_size, none_ok=False)
    steps = args.steps if args.steps is not None else (21 if args.dims == 1 else 9)
    if not 2 <= steps <= 201:
        raise VitqError(f"--steps {steps} is invalid (expected 2..201 points per direction)")
    if not 0 < args.radius <= MAX_RADIUS:
        raise VitqError(f"--radius {args.radius} is invalid (expected a relative change in (0, {MAX_RADIUS}], "
                        "e.g. 0.05)")
    if not args.temperature > 0:
        raise VitqError(f"--temperature {args.temperature} is invalid (expected a positive number, e.g. 3)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise VitqError(f"--device {args.device!r} is invalid (expected cpu, cuda, cuda:0, ...)") from None
    cfg = state_folder(args.state)
    if cfg.get("model") not in (None, args.model):
        raise VitqError(f"--state {args.state} was made for model {cfg['model']}, not --model {args.model}")
    weights_file(args.weights)
    records = image_records("--calib", args.calib, args.num_calib, "--num-calib", args.seed)
    model = create_model(args.model, weights=args.weights, **(cfg.get("model_args") or {}))
    qmodel = load(model, args.state)
    quiet = bool(getattr(args, "quiet", False))
    images, paths = load_images(args.calib, args.num_calib, args.seed, model, args.batch_size, records)
    calib = CalibData(images, batch_size=args.batch_size, device=device, progress=not quiet, seed=args.seed)
    model.to(device)
    qmodel.to(device)
    result = compute_landscape(qmodel, model, calib, block=args.block, dims=args.dims, steps=steps,
                               radius=args.radius, seed=args.seed, temperature=args.temperature)
    result = {"model": args.model, "weights": os.path.abspath(args.weights) if args.weights else None,
              "weights_sha256": sha256_file(args.weights) if args.weights else None,
              "state": os.path.abspath(args.state), "scheme": cfg.get("scheme"), "calib": os.path.abspath(args.calib),
              "threads": getattr(args, "threads", None),
              "calib_images": paths, **result}
    bad = sum(1 for v in (result["infonce"] if args.dims == 1 else sum(result["infonce"], []))
              if not math.isfinite(v))
    if bad:
        log.warning("%d of %d landscape points gave a non-finite infoNCE loss (--temperature %g too small?)", bad,
                    steps ** args.dims, args.temperature)
    write_outputs(result, out_dir)
    if not quiet:
        print(f"landscape of {result['block']} -> {os.path.join(out, PNG_FILE)}")
    return 0
