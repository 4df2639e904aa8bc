"""The loss landscape over one block's quantization scales (the figure behind Evol-Q).

For a saved quantization state, the qkv and proj weight scales of one block are moved along one random
direction (1-D) or two (2-D grid): ``s(a, b) = |s ⊙ (1 + a·u + b·v)|`` with u, v ~ N(0, 1) per scale,
rescaled to RMS 1, so ``a`` is the relative (RMS) change of the scales. At each point the infoNCE loss and the
top-1 agreement with the float model over the calibration images are measured (only the blocks from the
perturbed one to the end run; the block's input is cached). Writes ``landscape.png`` and ``landscape.json``
(the command: :mod:`vitq.cli.landscape`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.quant.base import EPS
from vitq.refine.evolq_search import get_vector, search_space, set_vector
from vitq.refine.fitness import FitnessEvaluator, infonce_loss
from vitq.state import OutputDir, write_json

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
    folder = out if isinstance(out, OutputDir) else OutputDir(out, overwrite, command="landscape")
    with folder:
        plot_landscape(result, folder.file(PNG_FILE))
        write_json(folder.file(JSON_FILE), result)
        folder.commit()
