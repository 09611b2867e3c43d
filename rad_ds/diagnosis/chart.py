"""The diagnosis chart (``redundancy.png``): per-layer redundancy with the selected layers marked per k,
and acceptance / speed-up against k."""

from __future__ import annotations

from pathlib import Path

from rad_ds.core.io import atomic_path


def draw_chart(report: dict, path: str | Path) -> Path:
    """Per-layer redundancy (selected layers marked per k) and acceptance / speed-up against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = report["layers"]
    sels = sorted(report["selections"], key=lambda s: s["k"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    xs = [d["index"] for d in layers]
    ys = [d["redundancy"] if d["redundancy"] is not None else 0.0 for d in layers]
    colors = ["tab:blue" if d["type"] == "attention" else "lightgrey" for d in layers]
    ci = [d.get("redundancy_ci") for d in layers]  # bootstrap intervals over prompts (newer reports)
    yerr = None
    if any(c for c in ci):
        yerr = [[y - c[0] if c else 0.0 for y, c in zip(ys, ci)], [c[1] - y if c else 0.0 for y, c in zip(ys, ci)]]
    ax1.bar(xs, ys, color=colors, yerr=yerr, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "black"})
    ymax = max([c[1] for c in ci if c] + ys + [1e-6])
    markers = "v^os*Dxp"
    for j, s in enumerate(sels):
        ax1.scatter(s["layers"], [ymax * (1.04 + 0.06 * j)] * len(s["layers"]), marker=markers[j % len(markers)],
                    s=28, color=f"C{j + 1}", label=f"k={s['k']} selected", zorder=3)
    ax1.set_xlabel("layer")
    note = "\n95% bootstrap over prompts" if yerr else ""
    ax1.set_ylabel("redundancy\n(acceptance, only this layer skipped)" + note)
    ax1.set_title(f"{report['model']}: attention redundancy")
    ax1.set_ylim(0, ymax * (1.12 + 0.06 * len(sels)))
    ax1.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ks = [s["k"] for s in sels]
    ax2.plot(ks, [s["acceptance_rate"] for s in sels], "o-", label="acceptance rate")
    ax2.set_xlabel("k (attention layers skipped)")
    ax2.set_ylabel("acceptance rate")
    ax2.set_ylim(0, 1.05)
    ax3 = ax2.twinx()
    ax3.plot(ks, [s["estimated_speedup"] for s in sels], "s--", color="tab:green", label="estimated speed-up")
    meas = [(s["k"], s["measured_speedup"]) for s in sels if s.get("measured_speedup") is not None]
    if meas:
        ax3.plot([m[0] for m in meas], [m[1] for m in meas], "d:", color="tab:red", label="measured speed-up")
    ax3.set_ylabel("speed-up over plain decoding")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="best", fontsize=8, framealpha=0.9)
    ax2.set_xticks(ks)
    ax2.set_title("acceptance and speed-up vs k")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


__all__ = ["draw_chart"]
