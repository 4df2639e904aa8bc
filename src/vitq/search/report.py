"""The hago search's record as text (the tables ``vitq quantize --search hago`` prints) and as a plot of the
accuracy–latency front (matplotlib, when installed)."""

from __future__ import annotations

import logging

log = logging.getLogger("vitq")


def _float(p: dict) -> str:
    return ", ".join(p["float"]) if p["float"] else "(none: every searched group quantized)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]


def text(record: dict) -> str:
    """Sensitivity and latency per group, the measured configurations (front marked), and the choice."""
    t = record["timing"]
    lm = record["latency_model"]
    lines = [f"hago search, {record['constraint']} on {record['runtime']} ({record['num_calib']} calibration images; "
             f"timing: batch {t['batch']}, {t['rounds']} alternated rounds, {t['threads']} threads, medians)"]
    if record["already_float"]:
        lines.append("already float (target or scheme): " + ", ".join(record["already_float"]))
    lat = {g["group"]: g for g in lm["groups"]}
    lines += ["", *_table(["group", "quantizers", "KL alone float", "KL gain", "KL alone quantized", "cost ms",
                           "saving vs all / vs float ms"],
                          [[s["group"], str(s["quantizers"]), f"{s['kl_alone_float']:.4g}", f"{s['kl_gain']:.4g}",
                            f"{s['kl_alone_quantized']:.4g}", f"{lat[s['group']]['cost_ms']:.2f}",
                            f"{lat[s['group']]['saving_vs_all_ms']:.2f} / {lat[s['group']]['saving_vs_float_ms']:.2f}"]
                           for s in record["sensitivity"]])]
    lines.append(f"latency ms: float {lm['ms_float']:.2f}, all quantized {lm['ms_all_quantized']:.2f}; additivity "
                 f"residual {lm['residual']:+.0%} of the float − quantized gap")
    ref = record.get("float_reference")
    if ref:
        lines.append(f"×float is over the {ref['graph']}: {ref['ms'][-1]:.2f} ms (vitq's own float export "
                     f"{ref['ms_vitq_float_export'][-1]:.2f} ms, last timing)")
    if record.get("cpu_note"):
        lines.append(record["cpu_note"])
    front = {tuple(p["float"]) for p in record["pareto_front"]}
    rows = []
    for p in sorted(record["measured"], key=lambda p: -p["speedup"]):
        mark = ("*" if tuple(p["float"]) in front else "") + ("  <- chosen" if p["float"] == record["chosen"]["float"]
                                                               else "")
        rows.append([_float(p), f"{p['kl']:.4g}", f"{p['predicted_kl']:.4g}", f"{p['agreement']:.1f}",
                     f"{p['speedup']:.2f}", f"{p['predicted_speedup']:.2f}", str(p["stage"]), mark])
    lines += ["", *_table(["float groups", "KL", "predicted", "agreement %", "×float", "predicted", "stage",
                           "front"], rows)]
    a = record["additivity"]
    lines += ["", f"re-measured {a['configurations']} configurations: mean |predicted − measured| speed-up "
                  f"{a['speedup_mean_abs_error']:.2f}×, KL {a['kl_mean_abs_error']:.3g}",
              f"chosen: {_float(record['chosen'])}: {record['chosen']['speedup']:.2f}× float, calibration KL "
              f"{record['chosen']['kl']:.4g}, agreement {record['chosen']['agreement']:.1f} %"]
    return "\n".join(lines)


def plot(record: dict, path: str) -> bool:
    """The measured configurations (speed-up over float vs calibration KL), the front and the choice, as a PNG
    at ``path``. False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: no Pareto plot (the table is in results.json)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = record["measured"]
    front = sorted(record["pareto_front"], key=lambda p: p["speedup"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([p["speedup"] for p in pts], [p["kl"] for p in pts], s=18, color="0.6", label="measured")
    ax.plot([p["speedup"] for p in front], [p["kl"] for p in front], "o-", color="C0", ms=5, label="Pareto front")
    c = record["chosen"]
    ax.scatter([c["speedup"]], [c["kl"]], s=110, facecolors="none", edgecolors="C3", linewidths=2, label="chosen")
    ax.set_xlabel(f"speed-up over float ({record['runtime']}, batch {record['timing']['batch']})")
    ax.set_ylabel("KL(float ‖ model), calibration images")
    ax.set_title(f"hago search, {record['constraint']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
