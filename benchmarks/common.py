"""The one harness of the benchmark scripts (run each as ``python -m benchmarks.NAME`` from the repository root).

- :class:`Bench`: a model, its transform, its val images and their float logits, loaded once per model; a row is
  one :func:`vitq.quantize` call (:meth:`Bench.row`) scored against the float logits with
  :class:`vitq.evaluate.Metrics` (top-1, agreement, KL).
- Real data paths, machine/version info.
- JSON records, tables, mean ± std cells, and writing one section of BENCHMARKS.md (between markers, so each
  script owns its section and reruns replace it). Rows kept across runs live in sweep stores
  (``benchmarks/results/``, written by ``vitq sweep``; ``benchmarks/sweep_section.py`` reads them).
"""

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VITQ_SHARED", ROOT.parent / "shared"))
DEIT = "deit_tiny_patch16_224"
DEIT_WEIGHTS = SHARED / "models" / f"{DEIT}.safetensors"
CALIB_DIR = SHARED / "data" / "imagenet-sample" / "calib"
VAL_DIR = SHARED / "data" / "imagenet-sample" / "val"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
FIGURES = ROOT / "benchmarks" / "figures"


# ----------------------------------------------------------------------------------------------- data
def load_records(records, transform, num_workers: int = 0):
    """The images of ``records`` (vitq.data records), preprocessed into one tensor, with their labels; unreadable
    images are skipped and named on stderr."""
    from vitq.data import read_images

    xs, ys, loader = read_images(records, transform, batch_size=50, num_workers=num_workers)
    if loader.skipped:
        print(f"skipped unreadable images: {loader.skipped}", file=sys.stderr)
    return xs, ys


def select(folder, num, seed: int = 0):
    """A seeded choice of ``num`` records of an ImageNet-style folder (all when None)."""
    from vitq.data import scan_image_folder, select_records

    return select_records(scan_image_folder(folder), num, seed)


def load_images(folder, num, transform, seed: int = 0, num_workers: int = 0):
    """A seeded choice of ``num`` images of an ImageNet-style folder (all when None), preprocessed into one
    tensor, with their labels."""
    return load_records(select(folder, num, seed), transform, num_workers)


@torch.no_grad()
def batched_logits(model, x, batch_size: int = 50):
    """``model`` over ``x`` in batches, logits concatenated."""
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def metrics(float_logits, q_logits, labels, chunk: int | None = None) -> dict:
    """:class:`vitq.evaluate.Metrics` of quantized against float logits: ``{"num_images", "float", "quant"}``.
    ``chunk``: update batch by batch (the KL sum then adds per-batch sums, as the scripts that did so)."""
    from vitq.evaluate import Metrics

    m = Metrics()
    step = chunk or len(labels)
    for i in range(0, len(labels), step):
        m.update(float_logits[i:i + step], q_logits[i:i + step], labels[i:i + step])
    return m.result()


# ----------------------------------------------------------------------------------------------- the harness
@dataclass
class Row:
    """One quantized model and how it scored: ``record`` is vitq.quantize's record of the run, ``seconds`` the
    wall time of the quantize call, ``result`` the Metrics result on the val images."""

    qmodel: torch.nn.Module
    record: dict
    seconds: float
    result: dict = field(default_factory=dict)
    eval_seconds: float = 0.0

    @property
    def quant(self) -> dict:
        return self.result["quant"]

    @property
    def info(self) -> dict:
        """What the calibration method returned (vitq.calibrate's dict)."""
        return self.record["calibration"]


class Bench:
    """A model with its images and float logits, loaded once; rows are quantize calls scored on the val images."""

    def __init__(self, name: str = DEIT, weights=DEIT_WEIGHTS, model=None):
        from vitq.data import model_transform
        from vitq.models.loading import create_model

        self.name, self.weights = name, Path(weights)
        self.model = model if model is not None else create_model(name, weights=weights)
        self.transform, self.desc = model_transform(self.model)
        self.calib_x = self.val_x = self.val_y = self.float_logits = None
        self.float_seconds = 0.0

    def calib(self, num, seed: int = 0, num_workers: int = 0, folder=CALIB_DIR) -> torch.Tensor:
        """A seeded draw of ``num`` calibration images (all when None); the first draw is ``self.calib_x``."""
        x = load_images(folder, num, self.transform, seed=seed, num_workers=num_workers)[0]
        if self.calib_x is None:
            self.calib_x = x
        return x

    def val(self, num=None, num_workers: int = 0, records=None) -> None:
        """Load the val images (``num`` of them, all when None, or ``records``) and their float logits."""
        if records is None:
            records = select(VAL_DIR, num)
        self.val_x, self.val_y = load_records(records, self.transform, num_workers)
        t0 = time.perf_counter()
        self.float_logits = batched_logits(self.model, self.val_x)
        self.float_seconds = time.perf_counter() - t0

    @property
    def float_result(self) -> dict:
        """Top-1 / top-5 of the float model on the val images."""
        return metrics(self.float_logits, self.float_logits, self.val_y)["float"]

    def score(self, qmodel, chunk: int | None = None) -> tuple[dict, float]:
        """Metrics of ``qmodel`` on the val images against the float logits, and the seconds of its forward."""
        t0 = time.perf_counter()
        q_logits = batched_logits(qmodel, self.val_x)
        seconds = time.perf_counter() - t0
        return metrics(self.float_logits, q_logits, self.val_y, chunk), seconds

    def quantize(self, scheme, method=None, calib=None, **kw) -> Row:
        """One :func:`vitq.quantize` call on ``calib`` (default: the first calibration draw), unscored."""
        import vitq

        kw.setdefault("progress", False)
        t0 = time.perf_counter()
        qmodel, record = vitq.quantize(self.model, self.calib_x if calib is None else calib, scheme, method, **kw)
        return Row(qmodel, record, time.perf_counter() - t0)

    def row(self, scheme, method=None, calib=None, chunk: int | None = None, **kw) -> Row:
        """One :func:`vitq.quantize` call, scored on the val images."""
        row = self.quantize(scheme, method, calib, **kw)
        row.result, row.eval_seconds = self.score(row.qmodel, chunk)
        return row


# ----------------------------------------------------------------------------------------------- run info
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


def git_commit() -> str:
    """The short commit of the checkout the benchmark runs from ("?" outside git)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "?"


def parse_config(spec: str) -> tuple[str, int, int, str]:
    """``scheme:W/A:method`` (a benchmark's --configs entry, e.g. ``fq:4/8:fqvit``) as (scheme, w, a, method)."""
    try:
        scheme, bits, method = spec.split(":")
        w, a = map(int, bits.split("/"))
    except ValueError:
        raise SystemExit(f"--configs {spec!r}: expected scheme:W/A:method, e.g. fq:4/8:fqvit") from None
    return scheme, w, a, method


def alternated_medians(*fns, repeats: int = 3) -> tuple[float, ...]:
    """Seconds of each of ``fns``, called in turn ``repeats`` times over: the median of each."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return tuple(statistics.median(t) for t in times)


# ----------------------------------------------------------------------------------------------- records
def write_json(path, data, **kw) -> None:
    """``data`` as indented JSON at ``path`` (its folder made when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, **kw) + "\n")


# ----------------------------------------------------------------------------------------------- markdown
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


def head(title: str, partial: bool | None = None, note: str = "") -> list[str]:
    """The first lines of a section: its title, a partial-run line (when ``partial`` is not None: empty for a
    finished run), the command (with ``note``) and the environment."""
    lines = [f"## {title}", ""]
    if partial is not None:
        lines += ["**Partial: the run had not finished when this was written.**" if partial else "", ""]
    return lines + [f"Command: `{command()}`{note}  ", f"{environment()}  "]


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(values, fmt: str = ".2f", always: bool = False) -> str:
    """``mean ± sample std`` of ``values`` (the std without a leading ``+`` of ``fmt``); one value alone as it
    is, unless ``always`` (then ± 0)."""
    values = list(values)
    if len(values) == 1 and not always:
        return format(values[0], fmt)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt.lstrip('+'))}"
