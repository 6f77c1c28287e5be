"""Tables and plots of a comparison: results.csv / .json, results.md, bars, gate heatmaps, threshold sweeps.

Input is what ``train/compare.py`` logs: metric rows ``{variant, seed, task, metric, value}``, gate rows
``{variant, seed, task, extractor, family, level, weight}`` (the mean gate weight over the val images; ``level``
None or absent: averaged over the model's levels, else the level's stride), sweep rows
``{variant, seed, task, thresholds, precision, recall, iou, fpr}``, ablation rows
``{variant, seed, task, metric, extractor, full, without, only, drop}`` (gated variants; :mod:`train.experiments.gate_proof`,
absent from runs before them) and a ``meta`` dict (tasks, primary metric per task, variants and their kinds,
extractors and their families, budget, timings, notes). Every figure is computed from those rows, so the report
can be rebuilt from a finished run (``train/report.py`` is the command line over this module)::

    python train/report.py runs/cmp
    python train/report.py --merge runs/cmp runs/cmp_seeds345 --output runs/cmp_6seeds   # more seeds later

>>> rows = [{"variant": v, "seed": s, "task": "t", "metric": "acc", "value": x}
...         for v, s, x in [("single_a", 0, .5), ("single_a", 1, .7), ("gated_task", 0, .8), ("gated_task", 1, .8)]]
>>> agg = aggregate(rows)
>>> round(agg[("single_a", "t", "acc")]["mean"], 3), round(agg[("single_a", "t", "acc")]["std"], 4)
(0.6, 0.1414)
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from backbone_router.extractors.io.atomic import atomic_write_bytes  # noqa: E402
from backbone_router.router.card import plot_gate_panels  # noqa: E402
from backbone_router.train.experiments.gate_proof import (  # noqa: E402
    ablation_metric_rows,
    ablation_table,
    agreement_table,
    gate_proof_markdown,
    oracle_single,
    plot_gate_proof,
    spread_entry,
)

ROW_KEYS = ("variant", "seed", "task", "metric", "value")
KIND_COLOURS = {"single": "#8c8c8c", "mean": "#6a9fd4", "concat": "#2b5d9c", "routed": "#d9622b", "peer": "#3a9a4a"}


# ---- aggregation -------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(variant, task, metric) -> {"mean", "std" (sample, 0 for one seed), "n", "values"}; None/NaN skipped."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        v = r["value"]
        if v is not None and math.isfinite(float(v)):
            groups[(r["variant"], r["task"], r["metric"])].append(float(v))
    out = {}
    for key, vals in groups.items():
        a = np.asarray(vals, dtype=np.float64)
        out[key] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
                    "values": vals}
    return out


def primary_table(agg: dict, meta: dict) -> dict[str, dict[str, dict[str, Any] | None]]:
    """variant -> task -> the aggregate of the task's primary metric (None when missing)."""
    return {v: {t: agg.get((v, t, meta["primary"][t])) for t in meta["tasks"]} for v in meta["variants"]}


def task_average(table: dict, variant: str, tasks: list[str]) -> float | None:
    """Mean over tasks of the variant's primary-metric means (None if a task is missing)."""
    vals = [table[variant][t]["mean"] for t in tasks if table[variant][t] is not None]
    return float(np.mean(vals)) if len(vals) == len(tasks) else None


CHANCE_1_OVER_K = ("accuracy", "balanced_accuracy")  # a constant guess scores 1/K
FLOOR_0 = ("fg_iou", "fg_dice", "mIoU", "mDice")  # a model that finds nothing scores 0


def chance_level(meta: dict, task: str) -> float | None:
    """What a model that learned nothing scores on the task's primary metric: 1/K for (balanced) accuracy (K from
    ``meta["num_classes"]``), 0 for IoU / Dice; None when unknown (another metric, a run from before num_classes)."""
    metric, k = meta["primary"][task], (meta.get("num_classes") or {}).get(task)
    if metric in CHANCE_1_OVER_K:
        return 1.0 / k if k else None
    return 0.0 if metric in FLOOR_0 else None


def at_chance(a: dict | None, meta: dict, task: str) -> bool:
    """Whether a variant's mean is indistinguishable from chance: 0 for IoU / Dice (under 0.5 points), else within
    two binomial standard errors of 1/K on the task's validation images (meta budget.val_items; 2 points if unknown)."""
    chance = chance_level(meta, task)
    if a is None or chance is None:
        return a is None
    if chance == 0.0:
        return a["mean"] < 0.005
    n = ((meta.get("budget") or {}).get("val_items") or {}).get(task)
    margin = 2 * math.sqrt(chance * (1 - chance) / n) if n else 0.02
    return a["mean"] <= chance + margin


def flat_tasks(table: dict, meta: dict) -> list[str]:
    """The tasks on which every variant is at chance or 0 (:func:`at_chance`): no variant there is better than another."""
    return [t for t in meta["tasks"] if chance_level(meta, t) is not None
            and all(at_chance(table[v][t], meta, t) for v in meta["variants"])]


def data_line(meta: dict) -> str:
    """What the numbers come from: per task its dataset and train / val images, the steps, batch and seeds."""
    budget, seeds = meta.get("budget") or {}, meta.get("seeds", [])
    train, val = budget.get("train_items") or {}, budget.get("val_items") or {}
    parts = [f"{t} on {(meta.get('datasets') or {}).get(t, '?')} ({train.get(t, '?')} train / {val.get(t, '?')} val "
             "images)" for t in meta["tasks"]]
    synthetic = " (synthetic: train/training/synthetic.py)" if meta.get("synthetic") else ""
    return (f"Data: {', '.join(parts)}{synthetic}. Budget per variant and seed: {budget.get('max_steps', '?')} steps "
            f"of batch {budget.get('batch_size', '?')}; seeds {seeds}.")


def gains(agg: dict, meta: dict) -> dict[str, Any]:
    """The best routed variant (highest task average) against the best single per task and against concat.

    Gains are in points (metric x 100). The best routed variant is one variant for all tasks (chosen by its
    average over tasks, not per task); the best single is the best single-extractor variant of each task.
    """
    table, tasks, kinds = primary_table(agg, meta), meta["tasks"], meta["kinds"]
    routed = [v for v in meta["variants"] if kinds[v] == "routed" and task_average(table, v, tasks) is not None]
    singles = [v for v in meta["variants"] if kinds[v] == "single"]
    concat = next((v for v in meta["variants"] if kinds[v] == "concat"), None)
    out: dict[str, Any] = {"best_routed": None, "per_task": {}, "vs_best_single_avg": None, "vs_concat_avg": None,
                           "routed_ge_best_single_every_task": None, "routed_ge_concat_plus_1_avg": None,
                           "nothing_learned": flat_tasks(table, meta) == list(tasks)}
    if not routed or out["nothing_learned"]:  # every variant at chance or 0: no best, no conclusion
        return out
    best = max(routed, key=lambda v: task_average(table, v, tasks))
    out["best_routed"] = best
    d_single, d_concat = [], []
    for t in tasks:
        mine = table[best][t]["mean"]
        cands = [(table[s][t]["mean"], s) for s in singles if table[s][t] is not None]
        entry: dict[str, Any] = {"routed": 100 * mine}
        if cands:
            value, name = max(cands)
            entry.update(best_single=name, best_single_value=100 * value, vs_best_single=100 * (mine - value))
            d_single.append(100 * (mine - value))
        if concat is not None and table[concat][t] is not None:
            entry.update(concat_value=100 * table[concat][t]["mean"], vs_concat=100 * (mine - table[concat][t]["mean"]))
            d_concat.append(entry["vs_concat"])
        out["per_task"][t] = entry
    if len(d_single) == len(tasks):
        out["vs_best_single_avg"] = float(np.mean(d_single))
        out["routed_ge_best_single_every_task"] = bool(min(d_single) >= 0)
    if len(d_concat) == len(tasks):
        out["vs_concat_avg"] = float(np.mean(d_concat))
        out["routed_ge_concat_plus_1_avg"] = bool(out["vs_concat_avg"] >= 1.0)
    return out


def peer_table(agg: dict, meta: dict) -> dict[str, dict[str, Any]]:
    """Per task a peer (``kind: peer``, e.g. an smp U-Net) has values for: each peer's primary metric and the
    best routed variant on that task, in points, with the differences routed - peer."""
    table, kinds = primary_table(agg, meta), meta["kinds"]
    peers = [v for v in meta["variants"] if kinds[v] == "peer"]
    routed = [v for v in meta["variants"] if kinds[v] == "routed"]
    out: dict[str, dict[str, Any]] = {}
    for t in meta["tasks"]:
        values = {p: 100 * table[p][t]["mean"] for p in peers if table[p][t] is not None}
        if not values:
            continue
        entry: dict[str, Any] = {"peers": values}
        cands = [(table[v][t]["mean"], v) for v in routed if table[v][t] is not None]
        if cands:
            value, name = max(cands)
            entry.update(best_routed=name, best_routed_value=100 * value,
                         routed_minus_peer={p: 100 * value - x for p, x in values.items()})
        out[t] = entry
    return out


def level_table(agg: dict, meta: dict, gate_rows: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and level setting, the best routed variant and the best variant of any kind, in points.

    A variant's level setting is the set of level strides of its per-level gate rows (every Router with levels logs
    one row per level); settings are keyed like ``"[4, 8, 16, 32]"``, in order of appearance. Variants without
    level rows (peers, runs from before levels) are left out.
    """
    table, kinds = primary_table(agg, meta), meta["kinds"]
    levels = {v: lv for v in meta["variants"] if (lv := gate_levels(gate_rows, v))}
    settings = list(dict.fromkeys(str(list(levels[v])) for v in meta["variants"] if v in levels))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t in meta["tasks"]:
        out[t] = {}
        for setting in settings:
            mine = [v for v in meta["variants"] if v in levels and str(list(levels[v])) == setting and table[v][t]]
            entry: dict[str, Any] = {}
            for key, pool in (("best_routed", [v for v in mine if kinds[v] == "routed"]), ("best", mine)):
                if pool:
                    value, name = max((table[v][t]["mean"], v) for v in pool)
                    entry.update({key: name, f"{key}_value": 100 * value})
            out[t][setting] = entry
    return out


def gate_proof_tables(meta: dict, gate_rows: list[dict], ablation_rows: list[dict]) -> dict[str, Any]:
    """summary.json's ``ablation``, ``agreement`` and ``spread`` of the gated variants (:mod:`train.experiments.gate_proof`);
    a variant without ablation rows (switched off, or a run from before them) has no ablation / agreement entry."""
    tasks, exts = meta["tasks"], meta["extractors"]
    gated = [v for v in meta["variants"] if meta["kinds"][v] == "routed"]
    gates = {v: gate_matrix(gate_rows, v, tasks, exts) for v in gated}
    ablation = ablation_table(aggregate(ablation_metric_rows(ablation_rows)), ablation_rows, gates, meta)
    spread = {v: spread_entry(tasks, gates[v], [(lv, gate_matrix(gate_rows, v, tasks, exts, lv))
                                                for lv in gate_levels(gate_rows, v)])
              for v in gated if np.isfinite(gates[v]).any()}
    return {"ablation": ablation, "agreement": agreement_table(ablation), "spread": spread}


# ---- tables --------------------------------------------------------------------------------------------
def write_rows(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """results.csv and results.json: one row per (variant, seed, task, metric)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_KEYS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in ROW_KEYS})
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_bytes(json_path, (json.dumps([{k: r[k] for k in ROW_KEYS} for r in rows], indent=1) + "\n").encode())
    return csv_path, json_path


def _fmt(a: dict | None) -> str:
    return "n/a" if a is None else f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}"


def results_markdown(agg: dict, meta: dict, gain: dict, gate_rows: list[dict] | None = None,
                     proof: dict | None = None) -> str:
    """Per task mean ± std over seeds (points), best per column in bold, and the oracle single (the best single per
    task); the peers and the level settings against the best routed (when there are several settings in
    `gate_rows`); then the gains of the best routed, and the gate proof (`proof`: :func:`gate_proof_tables`)."""
    tasks, variants = meta["tasks"], meta["variants"]
    table = primary_table(agg, meta)
    avgs = {v: task_average(table, v, tasks) for v in variants}
    flat = flat_tasks(table, meta)  # every variant at chance or 0 there: no best to mark
    best = {t: None if t in flat else max((table[v][t]["mean"] for v in variants if table[v][t] is not None),
                                          default=None) for t in tasks}
    best_avg = None if len(flat) == len(tasks) else max((a for a in avgs.values() if a is not None), default=None)
    seeds = meta.get("seeds", [])
    bold = ("every variant is at chance (1/K, within two binomial standard errors on the val images) or 0 on every "
            "task, so none is in bold" if len(flat) == len(tasks) else f"best per column in bold, except on "
            f"{', '.join(flat)}, where every variant is at chance or 0" if flat else "best per column in bold")
    lines = [data_line(meta), "",
             f"Primary metric per task, x100, mean ± std over {len(seeds)} seed(s) {seeds}; {bold}.",
             "", "| variant | kind | " + " | ".join(f"{t} ({meta['primary'][t]})" for t in tasks) + " | task mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for v in variants:
        cells = []
        for t in tasks:
            a = table[v][t]
            s = _fmt(a)
            cells.append(f"**{s}**" if a is not None and best[t] is not None and a["mean"] == best[t] else s)
        avg = "n/a" if avgs[v] is None else f"{100 * avgs[v]:.1f}"
        if avgs[v] is not None and avgs[v] == best_avg:
            avg = f"**{avg}**"
        lines.append(f"| {v} | {meta['kinds'][v]} | " + " | ".join(cells) + f" | {avg} |")
    oracle = oracle_single(table, meta)
    if any(oracle["per_task"].values()):
        cells = [f"{_fmt(e)} ({e['extractor']})" if e else "n/a" for e in oracle["per_task"].values()]
        avg = "n/a" if oracle["task_mean"] is None else f"{100 * oracle['task_mean']:.1f}"
        lines.append("| *oracle_single* | best single per task, chosen on val | " + " | ".join(cells) + f" | {avg} |")
    lines.append("")
    if meta.get("notes"):
        lines += [f"- {v}: {note}" for v, note in meta["notes"].items()] + [""]
    peers = peer_table(agg, meta)
    if peers:
        names = [v for v in variants if meta["kinds"][v] == "peer"]
        lines += ["Peers against the best routed variant of each task (points):", "",
                  "| task | best routed on the task | " + " | ".join(names) + " | "
                  + " | ".join(f"routed - {p}" for p in names) + " |", "|---|---|" + "---|" * (2 * len(names))]
        for t, e in peers.items():
            best = f"{e['best_routed_value']:.1f} ({e['best_routed']})" if "best_routed" in e else "n/a"
            vals = [f"{e['peers'][p]:.1f}" if p in e["peers"] else "n/a" for p in names]
            diffs = [f"{e['routed_minus_peer'][p]:+.1f}" if p in e.get("routed_minus_peer", {}) else "n/a" for p in names]
            lines.append(f"| {t} | {best} | " + " | ".join(vals + diffs) + " |")
        lines.append("")
    by_level = level_table(agg, meta, gate_rows or [])
    settings = list(next(iter(by_level.values()), {}))
    if len(settings) > 1:
        cols = [f"{k} {s}" for s in settings for k in ("best routed", "best")]
        diff = len(settings) == 2
        lines += ["Level settings: the best variant of each setting per task (points):", "",
                  "| task | " + " | ".join(cols) + (f" | best routed {settings[0]} - best {settings[1]} |" if diff else " |"),
                  "|---|" + "---|" * (len(cols) + diff)]
        for t, per in by_level.items():
            cells = [f"{per[s][f'{k}_value']:.1f} ({per[s][k]})" if k in per[s] else "n/a"
                     for s in settings for k in ("best_routed", "best")]
            if diff:
                a, b = per[settings[0]], per[settings[1]]
                cells.append(f"{a['best_routed_value'] - b['best_value']:+.1f}" if "best_routed" in a and "best" in b
                             else "n/a")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    proof_md = gate_proof_markdown(proof["ablation"], proof["agreement"], proof["spread"], meta["extractors"]) \
        if proof else ""
    if gain["best_routed"] is None:
        lines.append("Every variant is at chance or 0 on every task: this run learned nothing to compare, so no "
                     "variant is best and nothing is concluded (more steps, data or real extractors)."
                     if gain.get("nothing_learned") else "No routed (gated) variant in this comparison: no gains to report.")
        return "\n".join(lines) + "\n" + (f"\n{proof_md}" if proof_md else "")
    lines += [f"Best routed variant (by task mean): **{gain['best_routed']}**.", "",
              "| task | routed | best single | routed - best single | concat | routed - concat |", "|---|---|---|---|---|---|"]
    for t in tasks:
        e = gain["per_task"][t]
        bs = f"{e['best_single_value']:.1f} ({e['best_single']})" if "best_single" in e else "n/a"
        ds = f"{e['vs_best_single']:+.1f}" if "vs_best_single" in e else "n/a"
        cc = f"{e['concat_value']:.1f}" if "concat_value" in e else "n/a"
        dc = f"{e['vs_concat']:+.1f}" if "vs_concat" in e else "n/a"
        lines.append(f"| {t} | {e['routed']:.1f} | {bs} | {ds} | {cc} | {dc} |")
    avg_s = "n/a" if gain["vs_best_single_avg"] is None else f"{gain['vs_best_single_avg']:+.1f}"
    avg_c = "n/a" if gain["vs_concat_avg"] is None else f"{gain['vs_concat_avg']:+.1f}"
    lines += [f"| **average** | | | {avg_s} | | {avg_c} |", "",
              f"- routed >= best single on every task: {gain['routed_ge_best_single_every_task']}",
              f"- routed >= concat + 1 point on average: {gain['routed_ge_concat_plus_1_avg']}"]
    return "\n".join(lines) + "\n" + (f"\n{proof_md}" if proof_md else "")


# ---- plots ---------------------------------------------------------------------------------------------
def plot_bars(agg: dict, meta: dict, path: Path) -> Path:
    """One panel per task: the primary metric of each variant, mean with std error bars over seeds, coloured by kind
    (legend), with a dashed line at chance (1/K for accuracy, 0 for IoU / Dice)."""
    tasks, variants = meta["tasks"], meta["variants"]
    table = primary_table(agg, meta)
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.45 * len(variants) + 1.5) * len(tasks), 4.2),
                             squeeze=False)
    for ax, t in zip(axes[0], tasks):
        means = [100 * table[v][t]["mean"] if table[v][t] else np.nan for v in variants]
        stds = [100 * table[v][t]["std"] if table[v][t] else 0.0 for v in variants]
        colours = [KIND_COLOURS.get(meta["kinds"][v], "#444444") for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, color=colours, capsize=3)
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{t}", fontsize=10)
        ax.set_ylabel(f"{meta['primary'][t]} x100")
        chance = chance_level(meta, t)
        if chance is not None:
            ax.axhline(100 * chance, color="#444444", linestyle="--", linewidth=1)
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            lo = min([m - s for m, s in zip(means, stds) if np.isfinite(m)] + ([100 * chance] if chance is not None else []))
            hi = max([m + s for m, s in zip(means, stds) if np.isfinite(m)] + ([100 * chance] if chance is not None else []))
            pad = max(1.0, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad > lo else hi + 1)
        ax.grid(axis="y", alpha=0.3)
    kinds = list(dict.fromkeys(meta["kinds"][v] for v in variants))
    handles = [Patch(color=KIND_COLOURS.get(k, "#444444"), label=k) for k in kinds]
    handles.append(Line2D([], [], color="#444444", linestyle="--", linewidth=1, label="chance (1/K) or 0"))
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles), frameon=False)
    fig.suptitle(f"mean ± std over seeds {meta.get('seeds', [])}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gate_matrix(gate_rows: list[dict], variant: str, tasks: list[str], extractors: list[str],
                level: int | None = None) -> np.ndarray:
    """tasks x extractors: the logged mean gate weight, averaged over seeds (NaN where nothing was logged).

    `level` None: the gate averaged over levels (rows without a level); else that level's stride.
    """
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in gate_rows:
        if r["variant"] == variant and r.get("level") == level and r["weight"] is not None:
            acc[(r["task"], r["extractor"])].append(float(r["weight"]))
    m = np.full((len(tasks), len(extractors)), np.nan)
    for i, t in enumerate(tasks):
        for j, e in enumerate(extractors):
            if acc.get((t, e)):
                m[i, j] = float(np.mean(acc[(t, e)]))
    return m


def gate_levels(gate_rows: list[dict], variant: str) -> list[int]:
    """The level strides a variant logged per-level gates for, ascending (empty for a model without levels)."""
    return sorted({int(r["level"]) for r in gate_rows if r["variant"] == variant and r.get("level") is not None})


def gate_panels(gate_rows: list[dict], variant: str, tasks: list[str],
                extractors: list[str]) -> list[tuple[int | None, np.ndarray]]:
    """(level stride, tasks x extractors matrix) per level, finest first; [(None, the averaged gate)] without levels."""
    levels = gate_levels(gate_rows, variant)
    return [(lv, gate_matrix(gate_rows, variant, tasks, extractors, lv)) for lv in levels or [None]]


def plot_gate_heatmap(gate_rows: list[dict], variant: str, tasks: list[str], extractors: list[str],
                      families: dict[str, str], path: Path) -> list[tuple[int | None, np.ndarray]]:
    """One task x extractor heatmap per level (:func:`gate_panels`), each extractor labelled by its family.

    Returns the panels shown: (level stride, matrix), or a single (None, averaged gate) for a model without levels.
    """
    panels = gate_panels(gate_rows, variant, tasks, extractors)
    plot_gate_panels(panels, tasks, extractors, families, variant, path)
    return panels


def sweep_curves(sweep_rows: list[dict], task: str, variant: str) -> dict[str, np.ndarray] | None:
    """Mean over seeds of the precision / recall / IoU curves of one variant on one binary seg task."""
    mine = [r for r in sweep_rows if r["task"] == task and r["variant"] == variant]
    if not mine:
        return None
    out = {"thresholds": np.asarray(mine[0]["thresholds"], dtype=np.float64)}
    for k in ("precision", "recall", "iou"):
        a = np.asarray([[np.nan if x is None else x for x in r[k]] for r in mine], dtype=np.float64)
        with warnings.catch_warnings():  # a threshold no seed predicts anything at: NaN precision, kept NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[k] = np.nanmean(a, axis=0)
    return out


def plot_sweeps(sweep_rows: list[dict], task: str, variants: list[str], kinds: dict[str, str], path: Path) -> Path:
    """Precision, recall and foreground IoU against the threshold, one line per variant (mean over seeds)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cmap = plt.get_cmap("tab10")
    for k, v in enumerate(variants):
        c = sweep_curves(sweep_rows, task, v)
        if c is None:
            continue
        style = "-" if kinds.get(v) == "routed" else "--"
        for ax, key in zip(axes, ("precision", "recall", "iou")):
            ax.plot(c["thresholds"], c[key], style, color=cmap(k % 10), label=v, marker="o", markersize=3)
    for ax, key in zip(axes, ("precision", "recall", "foreground IoU")):
        ax.set_xlabel("threshold on foreground probability")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task}: threshold sweep (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the whole report ------------------------------------------------------------------------------------
def write_report(out_dir: str | Path, rows: list[dict], gate_rows: list[dict], sweep_rows: list[dict],
                 meta: dict, ablation_rows: list[dict] | None = None) -> dict[str, Any]:
    """Write every table and plot into `out_dir`; returns their paths and the gate matrices shown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [k for k in ("tasks", "primary", "variants", "kinds", "extractors", "families") if k not in meta]
    if missing:
        raise ValueError(f"write_report: meta is missing {missing}")
    csv_path, json_path = write_rows(rows, out_dir)
    agg = aggregate(rows)
    gain = gains(agg, meta)
    ablation_rows = ablation_rows or []
    proof = gate_proof_tables(meta, gate_rows, ablation_rows)
    md = results_markdown(agg, meta, gain, gate_rows, proof)
    paths: dict[str, Any] = {"csv": csv_path, "json": json_path, "md": out_dir / "results.md"}
    atomic_write_bytes(paths["md"], md.encode())
    for name, obj in (("gates", gate_rows), ("sweeps", sweep_rows), ("ablation", ablation_rows)):
        paths[name] = out_dir / f"{name}.json"
        atomic_write_bytes(paths[name], (json.dumps(obj, indent=1) + "\n").encode())
    table = primary_table(agg, meta)
    summary = {"meta": meta, "gains": gain, "peers": peer_table(agg, meta), "levels": level_table(agg, meta, gate_rows),
               "primary": {v: {t: (None if a is None else {k: a[k] for k in ("mean", "std", "n")}) for t, a in r.items()}
                           for v, r in table.items()},
               **proof, "oracle_single": oracle_single(table, meta)}
    paths["summary"] = out_dir / "summary.json"
    atomic_write_bytes(paths["summary"], (json.dumps(summary, indent=1) + "\n").encode())

    paths["bars"] = plot_bars(agg, meta, out_dir / "bars.png")
    paths["gate_proof_png"] = (plot_gate_proof(proof["ablation"], proof["agreement"], meta["extractors"],
                                               out_dir / "gate_proof.png") if proof["ablation"] else None)
    heat, matrices = {}, {}
    gated = [v for v in meta["variants"] if meta["kinds"][v] == "routed"]
    def cells(m: np.ndarray) -> list[list[float | None]]:
        return [[None if not np.isfinite(x) else float(x) for x in row] for row in m]

    for v in gated:
        p = out_dir / f"gate_heatmap_{v}.png"
        panels = plot_gate_heatmap(gate_rows, v, meta["tasks"], meta["extractors"], meta["families"], p)
        levels = [lv for lv, _ in panels if lv is not None]
        heat[v], matrices[v] = p, {"tasks": meta["tasks"], "extractors": meta["extractors"],
                                   "families": [meta["families"][e] for e in meta["extractors"]],
                                   "matrix": cells(gate_matrix(gate_rows, v, meta["tasks"], meta["extractors"])),
                                   "levels": levels, "level_matrices": [cells(m) for lv, m in panels if lv is not None]}
    paths["heatmaps"] = heat
    paths["heatmap_values"] = out_dir / "gate_heatmaps.json"
    atomic_write_bytes(paths["heatmap_values"], (json.dumps(matrices, indent=1) + "\n").encode())
    sweeps = {}
    for t in meta["tasks"]:
        if any(r["task"] == t for r in sweep_rows):
            sweeps[t] = plot_sweeps(sweep_rows, t, meta["variants"], meta["kinds"], out_dir / f"sweep_{t}.png")
    paths["sweeps_png"] = sweeps
    return paths


def load_run(run: Path) -> tuple[list[dict], list[dict], list[dict], list[dict], dict]:
    """Metric, gate, sweep and ablation rows and the meta dict of a finished train/compare.py output dir (no
    ablation.json, a run from before it: no ablation rows)."""
    if (run / "results" / "meta.json").is_file():  # the per-(variant, seed) files: whatever is done, naming the rest
        from backbone_router.train.experiments.results import load_partial

        return load_partial(run)
    needed = [run / n for n in ("results.json", "gates.json", "sweeps.json", "summary.json")]
    if absent := [str(p) for p in needed if not p.is_file()]:
        raise FileNotFoundError(f"report: missing {absent}; is {run} a train/compare.py output dir?")
    rows, gate_rows, sweep_rows, summary = (json.loads(p.read_text()) for p in needed)
    ablation = run / "ablation.json"
    return rows, gate_rows, sweep_rows, json.loads(ablation.read_text()) if ablation.is_file() else [], summary["meta"]


SAME_IN_MERGED_RUNS = ("tasks", "primary", "variants", "kinds", "extractors", "families", "budget")


def merge_runs(runs: list[Path]) -> tuple[list[dict], list[dict], list[dict], list[dict], dict]:
    """The rows of several runs of one comparison with different seeds, as one run (see :func:`load_run`).

    The runs must agree on tasks, metrics, variants, extractors and budget, and their seeds must not overlap
    (e.g. ``compare.seeds=[3, 4, 5]`` after a run with seeds 0, 1, 2), so that every (variant, seed) is
    trained exactly once under the same settings.
    """
    rows, gate_rows, sweep_rows, ablation_rows, metas = [], [], [], [], []
    for run in runs:
        r, g, s, a, m = load_run(run)
        if metas:
            differ = [k for k in SAME_IN_MERGED_RUNS if m.get(k) != metas[0].get(k)]
            if differ:
                raise ValueError(f"report: {run} differs from {runs[0]} in {differ}; only seeds may differ")
            overlap = set(m.get("seeds", [])) & {seed for x in metas for seed in x.get("seeds", [])}
            if overlap:
                raise ValueError(f"report: {run} repeats seeds {sorted(overlap)} of an earlier run")
        rows, gate_rows, sweep_rows, ablation_rows, metas = rows + r, gate_rows + g, sweep_rows + s, ablation_rows + a, \
            metas + [m]
    meta = dict(metas[0])
    meta["seeds"] = sorted(seed for m in metas for seed in m.get("seeds", []))
    meta["merged_from"] = [str(r) for r in runs]
    for key in ("command", "cache", "timings_s"):  # per run, in the order of `runs`
        meta[key] = [m.get(key) for m in metas]
    return rows, gate_rows, sweep_rows, ablation_rows, meta
