"""Pieces shared by the ``vitq`` subcommands: flags every command takes, loading models and images for a
command, evaluation and its one-line summary, and the bookkeeping of method/refiner flags."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Sequence

import torch

from vitq.errors import VitqError

log = logging.getLogger("vitq")


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
    from vitq.data import read_images, report_images

    images, labels, loader = read_images(records, transform, batch_size, num_workers, min_size, progress, what)
    if images is None:
        raise VitqError(f"none of the {len(records)} {what} images could be read ({', '.join(loader.skipped[:3])} ...)")
    report_images(loader, what, log)
    return images, labels, list(loader.skipped)


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


def pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summary_line(results: dict) -> str:
    f, q = results.get("float"), results.get("quant")
    if not f or not q:
        return "no --val given: nothing evaluated"
    line = (f"float top-1 {pct(f['top1'])}  quant top-1 {pct(q['top1'])}  (top-5 {pct(f['top5'])} / "
            f"{pct(q['top5'])})  agreement {q['agreement']:.2f} %  KL {q['kl']:.4f}  on {results['num_val']} images")
    if q["top1"] is None:
        line += "\n(top-1 not available: --labels folder numbers the class folders, which are not the model's " \
                "classes; pass --class-map FILE to map them)"
    return line


def checkpoint_default(out_path: str, refiner: str) -> str:
    """Where a refiner's resumable checkpoint goes by default: a visible file beside the output folder."""
    return f"{out_path}.{refiner}-ckpt"


def first_sentence(text: str) -> str:
    """The whole first sentence of a docstring or description (joined over line breaks)."""
    flat = " ".join((text or "").split())
    for end in (". ", ".\n"):
        if end in flat:
            return flat[:flat.index(end) + 1]
    return flat


def common_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
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


class EntryOptions:
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


def given(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in argv (``--flag X`` or ``--flag=X``), for choosing what --help shows."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
