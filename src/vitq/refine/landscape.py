"""``vitq landscape``: the loss landscape over one block's quantization scales (the figure behind Evol-Q).

For a saved quantization state, the qkv and proj weight scales of one block are moved along one random
direction (1-D) or two (2-D grid): ``s(a, b) = |s ⊙ (1 + a·u + b·v)|`` with u, v ~ N(0, 1) per scale,
rescaled to RMS 1, so ``a`` is the relative (RMS) change of the scales. At each point the infoNCE loss and the
top-1 agreement with the float model over the calibration images are measured (only the blocks from the
perturbed one to the end run; the block's input is cached). Writes ``landscape.png`` and ``landscape.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.refine.evolq import EPS, FitnessEvaluator, get_vector, infonce_loss, search_space, set_vector

MAX_RADIUS = 1.0  # beyond a 100 % RMS change the scales flip sign and the plot shows only noise
PNG_FILE = "landscape.png"
JSON_FILE = "landscape.json"


def pick_block(evaluator: FitnessEvaluator, block: str | int | None) -> tuple[int, str, nn.Module]:
    """A block by name (``blocks.11``), by position among the blocks (``11``, ``-1``), or the last one."""
    blocks = evaluator.trunk.blocks()
    if block is None:
        return blocks[-1]
    text = str(block).strip()
    try:
        k = int(text)
    except ValueError:
        for b in blocks:
            if b[1] == text:
                return b
        names = ", ".join(n for _, n, _ in blocks[:4])
        raise VitqError(f"--block {text!r} is not a block of this model (expected an index 0..{len(blocks) - 1} "
                        f"or a name such as {names}, ...)") from None
    if not -len(blocks) <= k < len(blocks):
        raise VitqError(f"--block {k} is out of range (expected an index 0..{len(blocks) - 1} or a negative one)")
    return blocks[k]


@torch.no_grad()
def compute_landscape(qmodel: nn.Module, float_model: nn.Module, calib: CalibData, block: str | int | None = None,
                      dims: int = 1, steps: int = 21, radius: float = 0.05, seed: int = 0,
                      temperature: float = 3.0) -> dict:
    """infoNCE and top-1 agreement with float over a 1-D line or 2-D grid of relative scale perturbations.
    The model's scales are restored afterwards."""
    if dims not in (1, 2):
        raise VitqError(f"--dims {dims} is invalid (expected 1 or 2)")
    if steps < 2:
        raise VitqError(f"--steps {steps} is invalid (expected 2 or more)")
    if not 0 < radius <= MAX_RADIUS:
        raise VitqError(f"--radius {radius} is invalid (expected a relative change in (0, {MAX_RADIUS}], e.g. 0.05)")
    if not temperature > 0 or temperature != temperature:
        raise VitqError(f"--temperature {temperature} is invalid (expected a positive number, e.g. 3)")
    qmodel.eval()
    float_model.eval()
    t0 = time.perf_counter()
    ev = FitnessEvaluator(qmodel, float_model, calib, "infonce", temperature)
    unit, name, blk = pick_block(ev, block)
    qs = search_space(name, blk, ("attn",))
    base = get_vector(qs)
    gen = torch.Generator().manual_seed(int(seed))
    dirs = []
    for _ in range(dims):
        d = torch.randn(base.shape, generator=gen)
        dirs.append((d / d.pow(2).mean().sqrt()).to(base))
    coords = torch.linspace(-radius, radius, steps).tolist()
    float_top = [zf.argmax(1) for zf in ev.float_logits]
    n_images = sum(int(t.numel()) for t in float_top)

    def point(*ab: float) -> tuple[float, float]:
        factor = torch.ones_like(base)
        for a, d in zip(ab, dirs, strict=True):
            factor = factor + a * d
        set_vector(qs, (base * factor).abs().clamp_min(EPS))
        logits = ev.logits(unit)
        loss = sum(float(infonce_loss(z, zf, temperature)) for z, zf in zip(logits, ev.float_logits, strict=True))
        agree = sum(int((z.argmax(1) == t).sum()) for z, t in zip(logits, float_top, strict=True))
        return loss / len(logits), 100.0 * agree / n_images

    total = steps ** dims
    bar = calib.bar(None, f"landscape {name}", total=total)
    try:
        if dims == 1:
            loss, agree = [], []
            for a in coords:
                v = point(a)
                loss.append(v[0])
                agree.append(v[1])
                bar.update(1)
        else:
            loss = [[0.0] * steps for _ in range(steps)]
            agree = [[0.0] * steps for _ in range(steps)]
            for i, a in enumerate(coords):
                for j, b in enumerate(coords):
                    loss[i][j], agree[i][j] = point(a, b)
                    bar.update(1)
        set_vector(qs, base)
        center = point(*([0.0] * dims))
    finally:
        set_vector(qs, base)
        bar.close()
    out = {
        "block": name, "unit": unit, "dims": dims, "steps": steps, "radius": radius, "seed": int(seed),
        "temperature": temperature, "num_calib": len(calib), "batch_size": calib.batch_size,
        "scales": {n: q.scale.numel() for n, q in qs},
        "perturbation": "s * (1 + a*u [+ b*v]) per scale, u, v ~ N(0,1) rescaled to RMS 1; absolute value, "
                        f"clamped at {EPS}; a (rows) and b (columns) over the coordinates",
        "coordinates": coords,
        "infonce": loss, "agreement": agree,
        "center": {"infonce": center[0], "agreement": center[1]},
        "seconds": time.perf_counter() - t0,
    }
    return out


def plot_landscape(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = result["coordinates"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    title = f"{result['block']}: qkv+proj weight scales, {result['num_calib']} calibration images"
    if result["dims"] == 1:
        pct = [100 * c for c in coords]
        axes[0].plot(pct, result["infonce"], ".-", lw=1)
        axes[0].ticklabel_format(axis="y", useOffset=False, style="plain")
        axes[0].set_ylabel(f"infoNCE (T={result['temperature']})")
        axes[1].plot(pct, result["agreement"], ".-", lw=1, color="tab:orange")
        axes[1].set_ylabel("top-1 agreement with float (%)")
        for ax in axes:
            ax.axvline(0.0, color="gray", lw=0.5)
            ax.set_xlabel("relative (RMS) scale change along a random direction (%)")
    else:
        ext = [100 * coords[0], 100 * coords[-1], 100 * coords[0], 100 * coords[-1]]
        for ax, key, label in ((axes[0], "infonce", "infoNCE"), (axes[1], "agreement", "agreement (%)")):
            im = ax.imshow(torch.tensor(result[key]).numpy(), origin="lower", extent=ext, aspect="auto")
            bar = fig.colorbar(im, ax=ax, label=label)
            bar.formatter.set_useOffset(False)
            bar.update_ticks()
            ax.set_xlabel("direction 2 (%)")
            ax.set_ylabel("direction 1 (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out, overwrite: bool = False) -> None:
    """Write PNG and JSON into ``out`` (a path or an OutputDir) all at once: a temporary folder renamed into
    place."""
    from vitq.state import OutputDir, write_json

    folder = out if isinstance(out, OutputDir) else OutputDir(out, overwrite, command="landscape")
    with folder:
        plot_landscape(result, folder.file(PNG_FILE))
        write_json(folder.file(JSON_FILE), result)
        folder.commit()


def load_images(folder: str, num: int | None, seed: int, model: nn.Module, batch_size: int,
                records=None) -> tuple[torch.Tensor, list[str]]:
    import logging

    from vitq.data import make_loader, model_transform, report_images, scan_image_folder, select_records

    if records is None:
        records = select_records(scan_image_folder(folder, labels="folder"), num, seed)  # labels are not used
    transform, desc = model_transform(model)
    loader = make_loader(records, transform, batch_size, min_size=tuple(desc["input_size"][1:]))
    images = [x for x, _ in loader]
    if not images:
        raise VitqError(f"--calib {folder}: none of the {len(records)} images could be read")
    report_images(loader, "landscape", logging.getLogger("vitq"))
    skipped = set(loader.skipped)
    used = [r.path for r in records if r.path not in skipped]
    if num is not None and len(used) < num:
        logging.getLogger("vitq").warning("landscape uses %d images, fewer than --num-calib %d (%d in %s, %d "
                                          "unreadable)", len(used), num, len(records), folder, len(skipped))
    return torch.cat(images), used


def add_command(subparsers) -> None:
    from vitq.cli.validate import add_threads_flag

    p = subparsers.add_parser(
        "landscape", help="plot infoNCE and top-1 agreement over perturbed scales of one block",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    from vitq.cli import validate
    from vitq.models.loading import create_model, sha256_file
    from vitq.state import OutputDir, load

    out_dir = OutputDir(args.out, args.overwrite, command="landscape")
    out = out_dir.path
    validate.positive("--batch-size", args.batch_size, none_ok=False)
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
    cfg = validate.state_folder(args.state)
    if cfg.get("model") not in (None, args.model):
        raise VitqError(f"--state {args.state} was made for model {cfg['model']}, not --model {args.model}")
    validate.weights_file(args.weights)
    records = validate.image_records("--calib", args.calib, args.num_calib, "--num-calib", args.seed)
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
        import logging

        logging.getLogger("vitq").warning("%d of %d landscape points gave a non-finite infoNCE loss (--temperature "
                                          "%g too small?)", bad, steps ** args.dims, args.temperature)
    write_outputs(result, out_dir)
    if not quiet:
        print(f"landscape of {result['block']} -> {os.path.join(out, PNG_FILE)}")
    return 0
