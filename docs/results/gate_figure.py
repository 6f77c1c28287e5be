"""Run from the repo root: python docs/results/gate_figure.py VARIANT docs/gate_levels.png

The README's gate figure (issue 24): per task, the gate's mean weight of each extractor at each level (a heat map,
columns labelled with the extractor's family) above the points the task's primary metric loses when that extractor
is removed at evaluation (bars), both averaged over the seeds of VARIANT's runs in runs/cmp_gate_*/results/."""
import io
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from backbone_router.extractors.io.atomic import atomic_write_bytes

TASKS = {"mtd_defect_seg": "MTD defects (seg)", "mtd_defect_type": "MTD defect type (cls)", "cfd_seg": "CFD cracks (seg)",
         "camvid_seg": "CamVid (seg)", "flowers_cls": "flowers12 (cls)"}
LEVELS = (4, 8, 16, 32)


def main(variant: str, out: Path) -> None:
    seeds = [json.loads(p.read_text()) for p in sorted(Path("runs").glob(f"cmp_gate_*/results/{variant}/seed_*.json"))]
    if not seeds:
        raise SystemExit(f"no seed files for {variant!r} under runs/cmp_gate_*/results/")
    rows = [r for d in seeds for r in d["gates"] if r["level"] is not None]
    extractors = list(dict.fromkeys(r["extractor"] for r in rows))
    family = {r["extractor"]: r["family"] for r in rows}
    fig = Figure(figsize=(3.0 * len(TASKS), 4.4))
    axes = fig.subplots(2, len(TASKS), gridspec_kw={"height_ratios": [4, 2]}, sharex="col")
    x = np.arange(len(extractors))
    for j, (task, title) in enumerate(TASKS.items()):
        w = np.array([[np.mean([r["weight"] for r in rows if r["task"] == task and r["extractor"] == e and r["level"] == s])
                       for e in extractors] for s in LEVELS])
        drop = [100 * np.mean([r["drop"] for d in seeds for r in d["ablation"] if r["task"] == task and r["extractor"] == e])
                for e in extractors]
        top, bottom = axes[0][j], axes[1][j]
        top.imshow(w, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, k), v in np.ndenumerate(w):
            top.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
        top.set_yticks(range(len(LEVELS)), [f"stride {s}" for s in LEVELS] if j == 0 else [""] * len(LEVELS), fontsize=7)
        top.set_title(title, fontsize=9)
        bottom.bar(x, drop, color=["#2b5d9c" if d >= 0 else "#bbbbbb" for d in drop])
        bottom.axhline(0, color="black", linewidth=0.6)
        bottom.set_xticks(x, [f"{e}\n{family[e]}" for e in extractors], fontsize=6)
        bottom.tick_params(axis="y", labelsize=7)
        if j == 0:
            bottom.set_ylabel("drop when\nremoved (points)", fontsize=7)
    fig.suptitle(f"{variant}: gate weight per level (top) and what removing the extractor costs (bottom), "
                 f"mean of {len(seeds)} seeds", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
