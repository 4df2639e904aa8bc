"""The export benchmark's accuracy–speed plane: per runtime, every model of the run as a point (speed over float at
batch 32, top-1 agreement with float on val/), vitq's models against the runtimes' own quantizers, and which
reference points vitq's models dominate (at least as fast and as accurate, better in one)."""

from __future__ import annotations

from pathlib import Path


def dominated(res: dict, runtime: str, is_vitq) -> dict[str, list[str]]:
    """reference label -> the vitq labels that dominate it in ``runtime`` (empty list: none does)."""
    pts = {n: (r["x32"], r["agreement"]) for (rt, n), r in res.items() if rt == runtime and "x32" in r}
    ours = {n: p for n, p in pts.items() if is_vitq(n)}
    out = {}
    for n, (s, a) in pts.items():
        if is_vitq(n) or n == "float":
            continue
        out[n] = [m for m, (s2, a2) in ours.items() if s2 >= s and a2 >= a and (s2 > s or a2 > a)]
    return out


def plot(res: dict, is_vitq, path: Path) -> Path | None:
    """Draw the plane of each runtime side by side into ``path`` (PNG); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runtimes = sorted({rt for rt, _ in res})
    fig, axes = plt.subplots(1, len(runtimes), figsize=(6.5 * len(runtimes), 4.8), squeeze=False)
    for ax, runtime in zip(axes[0], runtimes, strict=True):
        for (rt, n), r in res.items():
            if rt != runtime or "x32" not in r:
                continue
            colour = "tab:blue" if is_vitq(n) else ("0.4" if n == "float" else "tab:red")
            ax.scatter(r["x32"], r["agreement"], c=colour, s=36, zorder=3)
            ax.annotate(n if len(n) <= 48 else n[:46] + "…", (r["x32"], r["agreement"]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_title(f"{runtime}: vitq (blue) vs the runtime's quantizers (red)", fontsize=9)
        ax.set_xlabel("speed over float, batch 32 (×)")
        ax.set_ylabel("top-1 agreement with float on val/ (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def lines(res: dict, is_vitq, figure: Path | None) -> list[str]:
    """The section's paragraph on the plane: per runtime, which reference points vitq dominates and which not."""
    out = ["", "Accuracy–speed plane (batch 32)" + (f": `{figure.as_posix()}`." if figure else " (no matplotlib).")]
    for runtime in sorted({rt for rt, _ in res}):
        dom = dominated(res, runtime, is_vitq)
        won = [n for n, by in dom.items() if by]
        lost = [n for n, by in dom.items() if not by]
        out.append(f"- {runtime}: vitq dominates {len(won)} of {len(dom)} reference points"
                   + (f"; not: {', '.join(lost)}" if lost else "") + ".")
    return out
