"""Run from the repo root: python docs/results/gate_rounds.py CANDIDATE > docs/results/gate_roundN.md

Issue 24 (docs/gate.md): gated_image (as shipped) against a candidate gated variant on configs/compare_gate.yaml,
seeds 0-2: round 1 `gated_image_taskbias`, round 2 `gated_image_probe`. Reads
runs/cmp_gate_*/results/<variant>/seed_<n>.json; agreement as in train/experiments/gate_proof (seed-averaged weights and
drops, Spearman); prints the markdown of the round's tables and the rule's figures."""
import json
import statistics as st
import sys
from pathlib import Path

import numpy as np

from backbone_router.train.experiments.gate_proof import spearman

PRIMARY = {"mtd_defect_seg": "fg_iou", "mtd_defect_type": "balanced_accuracy", "cfd_seg": "fg_iou",
           "camvid_seg": "mIoU", "flowers_cls": "balanced_accuracy"}
DESIGN = ["mtd_defect_seg", "mtd_defect_type", "camvid_seg"]
EXT = ["mnv2", "effl0", "ssl_r50", "geo", "tex"]
res = {}
CANDIDATE = sys.argv[1]
for p in sorted(Path("runs").glob("cmp_gate_*/results/gated_image*/seed_*.json")):
    d = json.loads(p.read_text())
    if d["variant"] in ("gated_image", CANDIDATE):
        res.setdefault(d["variant"], []).append(d)
out = {}


def total_variation(a, b):
    return 0.5 * sum(abs(a[e] - b[e]) for e in EXT)


def fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


for v, seeds in res.items():
    prim = {t: [100 * next(r["value"] for r in d["rows"] if r["task"] == t and r["metric"] == m) for d in seeds] for t, m in PRIMARY.items()}
    gate = {t: {e: np.mean([r["weight"] for d in seeds for r in d["gates"] if r["task"] == t and r["extractor"] == e and r["level"] is None]) for e in EXT} for t in PRIMARY}
    lvl = {t: {s: {e: np.mean([r["weight"] for d in seeds for r in d["gates"] if r["task"] == t and r["extractor"] == e and r["level"] == s]) for e in EXT} for s in (4, 8, 16, 32)} for t in PRIMARY}
    drop = {t: {e: 100 * np.mean([r["drop"] for d in seeds for r in d["ablation"] if r["task"] == t and r["extractor"] == e]) for e in EXT} for t in PRIMARY}
    rho = {t: spearman([gate[t][e] for e in EXT], [drop[t][e] for e in EXT]) for t in PRIMARY}
    out[v] = dict(n=len(seeds), seeds=sorted(d["seed"] for d in seeds), prim=prim, gate=gate, drop=drop, rho=rho, lvl=lvl,
                  spread4=total_variation(lvl["cfd_seg"][4], lvl["camvid_seg"][4]),
                  geo_fine={s: lvl["cfd_seg"][s]["geo"] for s in (4, 8)},
                  top_fine={s: max(EXT, key=lambda e: lvl["cfd_seg"][s][e]) for s in (4, 8)},
                  sem_coarse={t: {s: lvl[t][s]["mnv2"] + lvl[t][s]["effl0"] for s in (16, 32)} for t in ("camvid_seg", "flowers_cls")})

def ms(x):
    return f"{st.mean(x):.1f} ± {st.stdev(x):.1f}"
print("| variant | seeds | " + " | ".join(f"{t} ({m})" for t, m in PRIMARY.items()) + " |")
print("|---|---|" + "---|" * len(PRIMARY))
for v, o in out.items():
    print(f"| {v} | {o['seeds']} | " + " | ".join(ms(o["prim"][t]) for t in PRIMARY) + " |")
print()
print("| variant | " + " | ".join(f"ρ {t}" for t in PRIMARY) + " | mean ρ (all) | mean ρ (design) | TV CFD-CamVid @4 | geo on CFD @4 / @8 (largest) | semantic CNNs @16 / @32 CamVid; flowers |")
print("|---|" + "---|" * (len(PRIMARY) + 5))
for v, o in out.items():
    r = o["rho"]
    print(f"| {v} | " + " | ".join(fmt(r[t]) for t in PRIMARY) + f" | {np.mean([r[t] for t in PRIMARY if r[t] is not None]):.2f}"
          f" | {np.mean([r[t] for t in DESIGN if r[t] is not None]):.2f} | {o['spread4']:.2f}"
          f" | {o['geo_fine'][4]:.2f} / {o['geo_fine'][8]:.2f} ({o['top_fine'][4]}, {o['top_fine'][8]})"
          f" | {o['sem_coarse']['camvid_seg'][16]:.2f} / {o['sem_coarse']['camvid_seg'][32]:.2f}; "
          f"{o['sem_coarse']['flowers_cls'][16]:.2f} / {o['sem_coarse']['flowers_cls'][32]:.2f} |")
print()
print("| variant | task | " + " | ".join(f"{e} gate / drop" for e in EXT) + " |")
print("|---|---|" + "---|" * len(EXT))
for v, o in out.items():
    for t in PRIMARY:
        print(f"| {v} | {t} | " + " | ".join(f"{o['gate'][t][e]:.2f} / {o['drop'][t][e]:+.1f}" for e in EXT) + " |")
# the rule (docs/gate.md): design tasks, candidate vs gated_image
print()
print("Gate weight per level (stride 4 / 8 / 16 / 32), mean over seeds and val images:")
print()
print("| variant | task | " + " | ".join(EXT) + " |")
print("|---|---|" + "---|" * len(EXT))
for v, o in out.items():
    for t in PRIMARY:
        print(f"| {v} | {t} | " + " | ".join(" / ".join(f"{o['lvl'][t][s][e]:.2f}" for s in (4, 8, 16, 32)) for e in EXT) + " |")
a, b = out["gated_image"], out[CANDIDATE]
print()
for t in DESIGN:
    se = np.sqrt(st.variance(a["prim"][t]) / a["n"] + st.variance(b["prim"][t]) / b["n"])
    print(f"{t}: candidate - shipped = {st.mean(b['prim'][t]) - st.mean(a['prim'][t]):+.1f} (se {se:.1f})")
