"""Figures written as PNG files: the task x extractor heatmaps of gate weights that a model card
(router/card.py) and a comparison's report (train/experiments/reporting.py) both draw."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from backbone_router.extractors.io.atomic import atomic_write_bytes


def plot_gate_panels(panels: list[tuple[int | None, np.ndarray]], tasks: list[str], extractors: list[str],
                     families: dict[str, str], title: str, path: Path) -> Path:
    """One task x extractor heatmap per level, each extractor labelled by its family, written atomically as a PNG
    (matplotlib's Agg canvas through a bare Figure: no pyplot, no global backend switch)."""
    from matplotlib.figure import Figure

    w, h = 1.2 * len(extractors) + 0.6, 0.6 * len(tasks) + 1.8  # a panel; the task labels and colour bar: + 2.5
    fig = Figure(figsize=(w * len(panels) + 2.5, h))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for k, (ax, (level, m)) in enumerate(zip(axes[0], panels)):
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(extractors)), [f"{e}\n({families.get(e, '?')})" for e in extractors], fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks if k == 0 else [""] * len(tasks), fontsize=8)
        for i in range(len(tasks)):
            for j in range(len(extractors)):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if m[i, j] > 0.6 else "white")
        ax.set_title(f"mean gate weight: {title}" if level is None else f"level stride {level}", fontsize=10)
    if panels[0][0] is not None:
        fig.suptitle(f"mean gate weight per level: {title}", fontsize=10, y=1.04)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04 / len(panels) ** 0.5, pad=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
