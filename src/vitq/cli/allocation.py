"""`vitq allocation --state DIR [--plot FILE]`: print (and optionally plot) the weight bit width of every
quantized layer of a saved state, grouped per block into MSA and MLP, as PTQ-ViT's mixed precision chose it.

Bits come from the state's own config.json (every quantizer's bits), so any saved state works; when the folder
also holds the results.json of `vitq quantize`, the mixed-precision record (sensitivity σ, Ω, size) is shown
too.
"""

from __future__ import annotations

import json
import os
import re

from vitq.errors import VitqError
from vitq.state import umask


def allocation_from_config(cfg: dict) -> dict:
    """{"groups": {module: weight bits}, "other": {layer: weight bits}} from a state config."""
    groups: dict[str, set] = {}
    other: dict[str, int] = {}
    for name, q in cfg.get("quantizers", {}).items():
        if q.get("role") != "weight" or not name.endswith(".weight_quant"):
            continue
        layer = name[: -len(".weight_quant")]
        m = re.match(r"(.*\.(?:attn|mlp))\.", layer)
        if m:
            groups.setdefault(m.group(1), set()).add(int(q["bits"]))
        else:
            other[layer] = int(q["bits"])
    return {"groups": {k: sorted(v) for k, v in groups.items()}, "other": other}


def _results_mp(directory: str) -> dict | None:
    path = os.path.join(directory, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    cal = res.get("calibration") if isinstance(res, dict) else None
    return cal.get("mixed_precision") if isinstance(cal, dict) else None


def format_allocation(alloc: dict, mp: dict | None) -> str:
    lines = [f"{'module':<28} {'bits':>6} {'sigma':>12} {'omega':>12}"]
    for name, bits in alloc["groups"].items():
        b = "/".join(map(str, bits))
        sigma = omega = ""
        if mp:
            s = mp.get("sensitivity_nuclear_norm", {}).get(name)
            o = mp.get("omega", {}).get(name, {}).get(str(bits[0]))
            sigma = f"{s:.4g}" if s is not None else ""
            omega = f"{o:.4g}" if o is not None else ""
        lines.append(f"{name:<28} {b:>6} {sigma:>12} {omega:>12}")
    for name, bits in alloc["other"].items():
        lines.append(f"{name:<28} {bits:>6}   (outside the blocks)")
    if mp:
        lines.append(f"target {mp.get('target_bits')} bits, average {mp.get('average_weight_bits', float('nan')):.3f} "
                     f"bits, quantized weights {mp.get('model_size_mb', float('nan')):.3f} MB "
                     f"(budget {mp.get('budget_size_mb', float('nan')):.3f} MB)")
    return "\n".join(lines)


def plot_allocation(alloc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(alloc["groups"])
    bits = [max(alloc["groups"][n]) for n in names]
    colors = ["tab:blue" if n.endswith(".attn") else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    ax.bar(range(len(names)), bits, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title("bit width per block (blue: MSA, orange: MLP)")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp)
        plt.close(fig)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_plot_path(path: str | None, overwrite: bool) -> None:
    """--plot must be a new .png path in an existing folder (an existing PNG only with --overwrite)."""
    from vitq.cli.validate import output_file_for_plot

    if path is None:
        return
    output_file_for_plot(path)
    if os.path.exists(path):
        if not overwrite:
            raise VitqError(f"--plot {path} already exists (expected a new path, or pass --overwrite)")
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise VitqError(f"--plot {path} exists and is not a PNG image (expected a new path; --overwrite "
                                "replaces only a PNG)")


def run(args) -> int:
    from vitq.cli.validate import state_folder

    check_plot_path(args.plot, args.overwrite)
    cfg = state_folder(args.state)
    alloc = allocation_from_config(cfg)
    if not alloc["groups"] and not alloc["other"]:
        raise VitqError(f"state {args.state} has no weight quantizers (expected a vitq quantize --out folder)")
    print(format_allocation(alloc, _results_mp(args.state)))
    if args.plot:
        plot_allocation(alloc, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser("allocation", help="print / plot the bit width per block MSA and MLP of a saved state")
    p.add_argument("--state", required=True, metavar="DIR", help="a vitq quantize --out folder")
    p.add_argument("--plot", default=None, metavar="FILE", help="also write a bar chart (PNG) to FILE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot PNG")
    p.set_defaults(func=run)
