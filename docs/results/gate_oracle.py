"""Run from the repo root: python docs/results/gate_oracle.py > docs/results/gate_oracle.md

Issue 24's "routing pays" on configs/compare_gate.yaml, seeds 0-2: every single extractor, concat and the gated
variants of rounds 1-3, the oracle_single row (per task the single extractor with the best mean over seeds), and
each gated variant against oracle_single and concat. Reads runs/cmp_gate_*/results/<variant>/seed_<n>.json."""
import json
import statistics as st
from pathlib import Path

PRIMARY = {"mtd_defect_seg": "fg_iou", "mtd_defect_type": "balanced_accuracy", "cfd_seg": "fg_iou",
           "camvid_seg": "mIoU", "flowers_cls": "balanced_accuracy"}
runs: dict[str, dict[int, dict]] = {}
for p in sorted(Path("runs").glob("cmp_gate_*/results/*/seed_*.json")):
    d = json.loads(p.read_text())
    runs.setdefault(d["variant"], {})[d["seed"]] = d
score = {v: {t: [100 * next(r["value"] for r in d["rows"] if r["task"] == t and r["metric"] == m) for d in seeds.values()]
             for t, m in PRIMARY.items()} for v, seeds in runs.items()}
singles = sorted(v for v in score if v.startswith("single_"))
gated = sorted(v for v in score if v.startswith("gated_"))
oracle = {t: max(singles, key=lambda v, t=t: st.mean(score[v][t])) for t in PRIMARY}


def ms(x: list[float]) -> str:
    return f"{st.mean(x):.1f} ± {st.stdev(x):.1f}" if len(x) > 1 else f"{x[0]:.1f}"


print("| variant | seeds | " + " | ".join(f"{t} ({m})" for t, m in PRIMARY.items()) + " | training s / seed |")
print("|---|---|" + "---|" * (len(PRIMARY) + 1))
for v in [*singles, "concat", *gated]:
    train_s = st.mean(d["train_s"] for d in runs[v].values())
    print(f"| {v} | {sorted(runs[v])} | " + " | ".join(ms(score[v][t]) for t in PRIMARY) + f" | {train_s:.0f} |")
print("| **oracle_single** | | " + " | ".join(f"{ms(score[oracle[t]][t])} ({oracle[t][7:]})" for t in PRIMARY) + " | |")
print()
print("| gated variant | minus oracle_single, per task (points) | tasks >= oracle_single | mean minus concat |")
print("|---|---|---|---|")
for v in gated:
    d_or = {t: st.mean(score[v][t]) - st.mean(score[oracle[t]][t]) for t in PRIMARY}
    d_cc = st.mean(st.mean(score[v][t]) - st.mean(score["concat"][t]) for t in PRIMARY)
    print(f"| {v} | " + ", ".join(f"{x:+.1f}" for x in d_or.values()) + f" | {sum(x >= 0 for x in d_or.values())} of "
          f"{len(PRIMARY)} | {d_cc:+.1f} |")
