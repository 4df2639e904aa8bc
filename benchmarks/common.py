"""Shared pieces of the benchmark scripts: real data paths, machine/version info, and writing one section of
BENCHMARKS.md (between markers, so each script owns its section and reruns replace it)."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VITQ_SHARED", ROOT.parent / "shared"))
DEIT_WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
CALIB_DIR = SHARED / "data" / "imagenet-sample" / "calib"
VAL_DIR = SHARED / "data" / "imagenet-sample" / "val"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def load_images(folder, num, transform, seed: int = 0, num_workers: int = 0):
    """A seeded choice of ``num`` images of an ImageNet-style folder (all when None), preprocessed into one
    tensor, with their labels."""
    from vitq.data import make_loader, scan_image_folder, select_records

    loader = make_loader(select_records(scan_image_folder(folder), num, seed), transform, batch_size=50,
                         num_workers=num_workers)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def batched_logits(model, x, batch_size: int = 50):
    """``model`` over ``x`` in batches, logits concatenated."""
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def environment() -> str:
    import timm

    import vitq

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return (f"machine: {cpu}, torch threads {torch.get_num_threads()}; python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}, vitq {vitq.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def command() -> str:
    """How this script was invoked, as ``python -m benchmarks.NAME ARGS`` (run from the repository root)."""
    module = os.path.splitext(os.path.relpath(sys.argv[0], ROOT))[0].replace(os.sep, ".")
    return "python -m " + " ".join(shlex.quote(a) for a in [module, *sys.argv[1:]])


def parse_config(spec: str) -> tuple[str, int, int, str]:
    """``scheme:W/A:method`` (a benchmark's --configs entry, e.g. ``fq:4/8:fqvit``) as (scheme, w, a, method)."""
    try:
        scheme, bits, method = spec.split(":")
        w, a = map(int, bits.split("/"))
    except ValueError:
        raise SystemExit(f"--configs {spec!r}: expected scheme:W/A:method, e.g. fq:4/8:fqvit") from None
    return scheme, w, a, method


def load_kept_rows(path: Path, settings: dict, fresh: bool) -> dict:
    """The rows a benchmark kept from earlier runs with the same ``settings`` (``{"settings", "rows"}``); a file
    written with other settings stops the run unless ``fresh`` (start over)."""
    if not path.exists() or fresh:
        return {"settings": settings, "rows": {}}
    kept = json.loads(path.read_text())
    if kept["settings"] != settings:
        raise SystemExit(f"{path} holds rows run with {kept['settings']}, not {settings}: use the same settings or "
                         "--fresh")
    return kept


def save_kept_rows(path: Path, kept: dict) -> None:
    """Write the kept rows whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(kept, indent=1) + "\n")
    os.replace(tmp, path)


def git_commit() -> str:
    """The short commit of the checkout the benchmark runs from ("?" outside git)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "?"


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
