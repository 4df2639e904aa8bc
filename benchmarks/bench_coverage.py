"""Coverage: which timm architectures vitq handles end to end, refuses by name, or fails on.

For each architecture (timm model module; the issue-22 list with ``--issue``, every module of ``timm.list_modules()``
otherwise, or ``--models a,b``) one small variant is built with random init (the one with the fewest parameters,
counted on the meta device; weight tensors timm initialises to all zeros, e.g. classifier heads, are re-drawn
with std 0.02 so the logits are not all 0), and run at W8A8 with ``minmax`` on 4 generated images (the model's
default input size) in both regimes: prepare, calibrate, quantized-vs-float logit cosine (lowest over the
images), save/load (identical logits), ONNX QDQ export and onnxruntime (cosine to vitq's own model). A regime is

- **handled** when every step ran, cosine > 0.98, the reload is identical and the file agrees with vitq's model
  (cosine > 0.995: a last-bit difference flips a code now and then, more often in deep CNNs);
- **refused** when ``prepare`` raised a VitqError (its message is the reason);
- **failed** otherwise (an exception, or a check below its bound: the row says which).

No real data is used. ``python -m benchmarks.bench_coverage --issue`` (the table of BENCHMARKS.md), ``--all``.

Not a grid (issue 23): another kind of measurement than a quantize job. A row is one timm architecture built
with random init and run through prepare / calibrate / save-load / ONNX export / onnxruntime on generated images,
classified handled / refused (a VitqError from prepare) / failed with a per-model time limit; a sweep job
quantizes a named model on an image folder and scores it on labelled images. The rows of a run are written, as
the run goes, to ``benchmarks/figures/coverage-issue_rows.json`` / ``coverage-all_rows.json`` (the full messages
the table cuts short); they are that run's record, never read back (no resume: a rerun starts over).
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, head, table, write_section

# the architectures of issue 22 (timm names of their small variants; dinov2 and CLIP at 224 to keep them small)
ISSUE = {
    "DeiT": "deit_tiny_patch16_224", "DeiT-distilled": "deit_tiny_distilled_patch16_224",
    "DeiT-III": "deit3_small_patch16_224", "ViT": "vit_tiny_patch16_224",
    "CLIP ViT-B": "vit_base_patch32_clip_224", "DINOv2 ViT (reg4)": "vit_small_patch14_reg4_dinov2",
    "PiT": "pit_ti_224", "Swin": "swin_tiny_patch4_window7_224", "LeViT": "levit_128s",
    "LeViT-conv": "levit_conv_128s", "ResNet-18": "resnet18", "ResNet-50": "resnet50", "RegNet": "regnetx_002",
    "MobileNetV2": "mobilenetv2_050", "MobileNetV3": "mobilenetv3_small_050", "EfficientNet": "efficientnet_b0",
    "EfficientNet-Lite": "tf_efficientnet_lite0", "ConvNeXt": "convnext_atto", "EVA-02": "eva02_tiny_patch14_224",
    "CaiT": "cait_xxs24_224", "ConViT": "convit_tiny", "CrossViT": "crossvit_tiny_240",
    "XCiT": "xcit_nano_12_p16_224", "EfficientFormer": "efficientformer_l1",
    "EfficientFormer-v2": "efficientformerv2_s0", "EfficientViT (MIT)": "efficientvit_b0",
    "EfficientViT (MSRA)": "efficientvit_m0", "FastViT": "fastvit_t8", "MobileViT": "mobilevit_xxs",
    "MobileViT-v2": "mobilevitv2_050", "TinyViT": "tiny_vit_5m_224", "RepVGG": "repvgg_a0",
    "GhostNet": "ghostnet_050",
}
KWARGS = {"vit_small_patch14_reg4_dinov2": {"img_size": 224}}
# bounds (random init, 4 images, the lowest cosine over them); every row gives the measured values
MIN_COS = {"matmul": 0.98, "fq": 0.98}
EXPORT_COS = 0.995
OUT = ROOT / "benchmarks" / "figures" / "coverage_rows.json"  # the run's record: SECTION_rows.json beside it


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def smallest(module: str) -> str | None:
    import timm

    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # noqa: BLE001  (a variant that does not build is skipped)
            continue
        if best is None or n < best[0]:
            best = (n, name)
    return None if best is None else best[1]


def build(name: str):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **KWARGS.get(name, {})).eval()
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() >= 2 and not w.any():
                w.normal_(0, 0.02)
    return model


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def check(model, x, regime: str, export: bool) -> tuple[str, str]:
    """(status, detail) of one regime."""
    import vitq
    from vitq.errors import VitqError

    scheme = vitq.Scheme(regime, w_bits=8, a_bits=8)
    try:
        q = vitq.prepare(model, scheme, method="minmax")
    except VitqError as e:
        return "refused", str(e).split("\n")[0][:160]
    vitq.calibrate(q, x, method="minmax", progress=False)
    with torch.no_grad():
        ref, out = model(x), q(x)
    cos = _cos(out, ref)
    if not cos > MIN_COS[regime]:
        return "failed", f"cosine {cos:.4f}"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "s").mkdir()
        vitq.save(q, Path(d) / "s")
        again = vitq.load(model, Path(d) / "s")
        with torch.no_grad():
            if not torch.equal(again(x), out):
                return "failed", f"cosine {cos:.4f}; reload differs"
        if not export:
            return "handled", f"cosine {cos:.4f} (export not run)"
        import onnxruntime as ort

        path = Path(d) / "m.onnx"
        vitq.export(q, path, example=x[:1], float_model=model)
        so = ort.SessionOptions()
        so.log_severity_level, so.intra_op_num_threads = 3, 1
        got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        ecos = _cos(torch.from_numpy(got), out)
    if not ecos > EXPORT_COS:
        return "failed", f"cosine {cos:.4f}; onnxruntime vs vitq {ecos:.4f}"
    return "handled", f"cosine {cos:.4f}, onnxruntime {ecos:.5f}"


def run_one(label: str, name: str, export: bool, limit: int) -> dict:
    from vitq.models import family_of
    from vitq.models.generic import input_size

    row = {"arch": label, "model": name}
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        model = build(name)
        row["family"] = family_of(model).name
        h, w = input_size(model)
        x = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(1))
        for regime in ("matmul", "fq"):
            try:
                row[regime] = check(model, x, regime, export)
            except _Timeout:
                raise
            except Exception as e:  # noqa: BLE001  (the table reports it)
                row[regime] = ("failed", f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}")
    except _Timeout:
        for regime in ("matmul", "fq"):
            row.setdefault(regime, ("failed", f"over the {limit} s limit"))
    except Exception as e:  # noqa: BLE001
        row.setdefault("family", "-")
        for regime in ("matmul", "fq"):
            row.setdefault(regime, ("failed", f"build: {type(e).__name__}: {str(e)[:120]}"))
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def render(rows: list[dict], title: str, note: str, partial: bool) -> str:
    def cell(r, k):
        s, d = r[k]
        return f"**{s}** {d}".replace("|", "/")

    lines = head(title, partial, note)
    counts = {k: {s: sum(1 for r in rows if r[k][0] == s) for s in ("handled", "refused", "failed")}
              for k in ("matmul", "fq")}
    n = len(rows)
    lines += ["", f"{n} architectures. matmul W8A8: {counts['matmul']['handled']} handled "
              f"({100 * counts['matmul']['handled'] / max(n, 1):.0f} %), {counts['matmul']['refused']} refused, "
              f"{counts['matmul']['failed']} failed; fq W8A8: {counts['fq']['handled']} handled, "
              f"{counts['fq']['refused']} refused, {counts['fq']['failed']} failed.", ""]
    lines.append(table(["architecture", "model", "family", "matmul W8A8", "fq W8A8", "s"],
                       [[r["arch"], r["model"], r["family"], cell(r, "matmul"), cell(r, "fq"), r["seconds"]]
                        for r in rows]))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--issue", action="store_true", help="the architectures of issue 22")
    g.add_argument("--all", action="store_true", help="every timm model module, its smallest variant")
    g.add_argument("--models", help="comma-separated timm names")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export and onnxruntime check")
    p.add_argument("--limit", type=int, default=400, help="seconds per model before it counts as failed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print the table, do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import timm

    if args.issue:
        todo = list(ISSUE.items())
    elif args.all:
        todo = [(m, s) for m in timm.list_modules() if (s := smallest(m)) is not None]
    else:
        todo = [(n, n) for n in args.models.split(",")]
    rows = []
    section = "coverage-issue" if args.issue else "coverage-all" if args.all else None
    title = ("Coverage: the architectures of issue 22" if args.issue else
             "Coverage: every timm architecture (smallest variant)")
    note = (" — W8A8, minmax, 4 generated images, random init, default input size; no real data; "
            f"{'no export' if args.no_export else 'export + onnxruntime'}; machine shared with other jobs")
    for label, name in todo:
        rows.append(run_one(label, name, not args.no_export, args.limit))
        r = rows[-1]
        print(f"{label:24s} {name:36s} {r['family']:10s} matmul {r['matmul'][0]:8s} fq {r['fq'][0]:8s} "
              f"{r['seconds']:6.1f}s  {r['matmul'][1]} | {r['fq'][1]}", flush=True)
        if section and not args.no_write:
            OUT.with_name(f"{section}_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
            write_section(section, render(rows, title, note, partial=len(rows) < len(todo)))
    if not section or args.no_write:
        print(render(rows, title, note, partial=False))


if __name__ == "__main__":
    main()
