"""The passkey heat map: accuracy by context length (columns) and needle depth (rows), each cell annotated with
its score and n, as in the needle-in-a-haystack plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def passkey_heatmap(cells: dict[int, dict[float, dict]], path: str | Path, title: str) -> Path:
    """``cells``: context -> depth -> ``{"score", "n", ...}`` (a score of None: no samples) -> a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted(cells)
    depths = sorted({d for c in contexts for d in cells[c]})
    grid = np.full((len(depths), len(contexts)), np.nan)
    for j, c in enumerate(contexts):
        for i, d in enumerate(depths):
            s = (cells[c].get(d) or {}).get("score")
            if s is not None:
                grid[i, j] = s
    fig, ax = plt.subplots(figsize=(1.2 * len(contexts) + 2.4, 0.55 * len(depths) + 1.8))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for j, c in enumerate(contexts):
        for i, d in enumerate(depths):
            cell = cells[c].get(d) or {}
            label = "-" if cell.get("score") is None else f"{cell['score']:.2f}\nn={cell['n']}"
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["passkey_heatmap"]
