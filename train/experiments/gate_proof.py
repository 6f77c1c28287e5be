"""Proof that a gate is right: ablation importance, its agreement with the gate, task spread, the oracle single.

- ablation (:func:`ablation_scores`, run by :mod:`train.experiments.comparison` on val after training, for every gated variant):
  per task and extractor, the task's primary metric without that extractor (``Router.forward(keep=the others)``,
  the kept gate weights renormalised) and with it alone (``keep=[it]``); its importance is the drop
  ``full - without``. Rows: ``{variant, seed, task, metric, extractor, full, without, only, drop}``.
- agreement (:func:`spearman`): Spearman's rank correlation, per task, between the gate's mean weight per extractor
  and that drop; None where it is undefined (a constant vector, fewer than two extractors).
- spread (:func:`spread_matrix`): the total-variation distance ``0.5 * sum_e |w_a[e] - w_b[e]|`` between two
  tasks' mean gate weights (0: the same weights, 1: disjoint extractors).
- oracle single (:func:`oracle_single`): per task, the single-extractor variant best on that task's val score (a
  choice made on the evaluation data itself, so an optimistic bound, not a variant one could ship).

The tables of train/experiments/reporting.py and the model card (router/card.py's ``ablation`` / ``agreement`` keys) show them.

>>> round(spearman([0.7, 0.2, 0.1], [5.0, 1.0, 2.0]), 3)
0.5
>>> spread_matrix(np.array([[0.5, 0.5], [1.0, 0.0]])).tolist()
[[0.0, 0.5], [0.5, 0.0]]
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backbone_router.extractors.io.atomic import atomic_write_bytes

ABLATION_FIELDS = ("full", "without", "only", "drop")


# ---- at evaluation ------------------------------------------------------------------------------------------------
def ablation_scores(score: Callable[[list[str]], float], extractors: list[str], full: float) -> list[dict[str, Any]]:
    """Per extractor ``{"extractor", "full", "without", "only", "drop"}`` from ``score(keep)`` (the metric with only
    the extractors `keep`), each keep-set scored once (two extractors: two scores); [] with fewer than two.

    >>> ablation_scores(lambda keep: {("a",): 0.6, ("b",): 0.1}[tuple(keep)], ["a", "b"], full=0.7)[0]
    {'extractor': 'a', 'full': 0.7, 'without': 0.1, 'only': 0.6, 'drop': 0.6}
    """
    if len(extractors) < 2:
        return []
    memo: dict[tuple[str, ...], float] = {}

    def scored(keep: list[str]) -> float:
        if tuple(keep) not in memo:
            memo[tuple(keep)] = float(score(keep))
        return memo[tuple(keep)]

    rows = []
    for e in extractors:
        without, only = scored([x for x in extractors if x != e]), scored([e])
        rows.append({"extractor": e, "full": float(full), "without": without, "only": only, "drop": float(full) - without})
    return rows


# ---- statistics ---------------------------------------------------------------------------------------------------
def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the mean of their ranks ([10, 20, 20] -> [1, 2.5, 2.5])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks, as scipy.stats.spearmanr); None when it is
    undefined: fewer than two pairs, a non-finite value, or a constant vector."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman: vectors of different lengths {len(a)} and {len(b)}")
    if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    norm = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return None if norm == 0 else float((ra * rb).sum() / norm)


def spread_matrix(weights: np.ndarray) -> np.ndarray:
    """tasks x tasks total-variation distances ``0.5 * sum |w_a - w_b|`` of a tasks x extractors weight matrix
    (NaN where a task's weights are unknown)."""
    w = np.asarray(weights, dtype=np.float64)
    return 0.5 * np.abs(w[:, None, :] - w[None, :, :]).sum(axis=2)


def cells(m: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON lists, NaN -> None."""
    return [[float(x) if np.isfinite(x) else None for x in row] for row in np.asarray(m, dtype=np.float64)]


# ---- tables for summary.json --------------------------------------------------------------------------------------
def ablation_metric_rows(ablation_rows: list[dict]) -> list[dict]:
    """Ablation rows as metric rows ``{variant, seed, task, metric: (field, extractor), value}``, the input of
    train/experiments/reporting.py's ``aggregate`` (mean and std over seeds)."""
    return [{"variant": r["variant"], "seed": r["seed"], "task": r["task"], "metric": (f, r["extractor"]), "value": r[f]}
            for r in ablation_rows for f in ABLATION_FIELDS]


def ablation_table(agg: dict, ablation_rows: list[dict], gates: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
    """variant -> task -> ``{"metric", "seeds", "full", "extractors": {e: {"gate", "drop", "drop_std", "without",
    "only"}}}`` (metric values as logged, means over seeds; gate: the mean gate weight), for the variants and tasks
    with ablation rows. `agg`: ``aggregate(ablation_metric_rows(ablation_rows))``; `gates`: variant -> the tasks x
    extractors gate matrix."""
    out: dict[str, Any] = {}
    for v in meta["variants"]:
        for i, t in enumerate(meta["tasks"]):
            mine = [r for r in ablation_rows if r["variant"] == v and r["task"] == t]
            if not mine:
                continue
            names = [e for e in meta["extractors"] if any(r["extractor"] == e for r in mine)]
            full = [agg.get((v, t, ("full", e))) for e in names]
            exts = {}
            for e in names:
                mean = {f: (a["mean"] if (a := agg.get((v, t, (f, e)))) else None) for f in ABLATION_FIELDS[1:]}
                drop = agg.get((v, t, ("drop", e)))
                gate = gates[v][i, meta["extractors"].index(e)] if v in gates else math.nan
                exts[e] = {"gate": float(gate) if np.isfinite(gate) else None, "drop": mean["drop"],
                           "drop_std": drop["std"] if drop else None, "without": mean["without"], "only": mean["only"]}
            out.setdefault(v, {})[t] = {"metric": mine[0]["metric"], "seeds": sorted({r["seed"] for r in mine}),
                                        "full": full[0]["mean"] if full[0] else None, "extractors": exts}
    return out


def agreement_table(ablation: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """variant -> task -> Spearman's rho between the mean gate weights and the removal drops (None: undefined)."""
    def rho(entry: dict) -> float | None:
        exts = entry["extractors"].values()
        gate, drop = [x["gate"] for x in exts], [x["drop"] for x in exts]
        return None if None in gate or None in drop else spearman(gate, drop)

    return {v: {t: rho(e) for t, e in per.items()} for v, per in ablation.items()}


def spread_entry(tasks: list[str], overall: np.ndarray, levels: list[tuple[int, np.ndarray]]) -> dict[str, Any]:
    """summary.json's task spread of one variant: the tasks x tasks distances of the gate averaged over levels
    (``overall``) and of each level's gate (``per_level``: stride -> matrix), from tasks x extractors matrices."""
    return {"tasks": tasks, "overall": cells(spread_matrix(overall)), "levels": [lv for lv, _ in levels],
            "per_level": {str(lv): cells(spread_matrix(m)) for lv, m in levels}}


def oracle_single(table: dict[str, dict[str, dict | None]], meta: dict) -> dict[str, Any]:
    """Per task the single-extractor variant with the best mean primary metric (`table`: reporting's primary_table):
    ``{"per_task": {task: {"variant", "extractor", "mean", "std", "n"} | None}, "task_mean": mean over tasks | None}``."""
    singles = [v for v in meta["variants"] if meta["kinds"][v] == "single"]
    names = meta.get("single_extractors") or {}
    per_task: dict[str, Any] = {}
    for t in meta["tasks"]:
        cands = [(table[v][t]["mean"], v) for v in singles if table[v][t] is not None]
        if not cands:
            per_task[t] = None
            continue
        _, v = max(cands)
        a = table[v][t]
        per_task[t] = {"variant": v, "extractor": names.get(v, v.removeprefix("single_")),
                       **{k: a[k] for k in ("mean", "std", "n")}}
    means = [e["mean"] for e in per_task.values() if e is not None]
    return {"per_task": per_task, "task_mean": float(np.mean(means)) if per_task and len(means) == len(per_task) else None}


def card_gate_proof(ablation: dict[str, Any], agreement: dict[str, Any], variant: str) -> dict[str, Any]:
    """One variant's ablation and agreement as router/card.py's ``card_data`` keys:
    ``{"ablation": {task: {extractor: {"drop", "only"}}}, "agreement": {task: rho | None}}``."""
    per = ablation.get(variant, {})
    return {"ablation": {t: {e: {"drop": x["drop"], "only": x["only"]} for e, x in entry["extractors"].items()}
                         for t, entry in per.items()},
            "agreement": dict(agreement.get(variant, {}))}


# ---- results.md ---------------------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def gate_proof_markdown(ablation: dict[str, Any], agreement: dict[str, Any], spread: dict[str, Any],
                        extractors: list[str]) -> str:
    """The gate-proof section of results.md: per gated variant and task the gate, removal drop and alone score of each
    extractor with the rank agreement, then per variant the task spread table; "" when there is nothing to show."""
    lines: list[str] = []
    if ablation:
        lines += ["Gate proof: each extractor removed at evaluation on val (the kept gate weights renormalised), mean "
                  "over seeds. gate = mean gate weight; drop = primary metric x100 with all extractors minus without "
                  "this one; only = x100 with this one alone; ρ = Spearman rank correlation of gate and drop.", "",
                  "| variant | task | " + " | ".join(f"{e} gate / drop / only" for e in extractors) + " | ρ(gate, drop) |",
                  "|---|---|" + "---|" * (len(extractors) + 1)]
        for v, per in ablation.items():
            for t, entry in per.items():
                row = []
                for e in extractors:
                    x = entry["extractors"].get(e)
                    row.append("n/a" if x is None else f"{_num(x['gate'], '.2f')} / "
                               f"{_num(None if x['drop'] is None else 100 * x['drop'], '+.1f')} / "
                               f"{_num(None if x['only'] is None else 100 * x['only'], '.1f')}")
                rho = agreement[v][t]
                lines.append(f"| {v} | {t} | " + " | ".join(row) + f" | {'undefined' if rho is None else f'{rho:.2f}'} |")
        lines.append("")
    if spread:
        lines += ["Task spread: total-variation distance between two tasks' mean gate weights (0: the same weights, "
                  "1: disjoint extractors), over levels, then [per level stride].", ""]
        for v, s in spread.items():
            tasks = s["tasks"]
            strides = "" if not s["levels"] else " [strides " + ", ".join(map(str, s["levels"])) + "]"
            lines += [f"**{v}**{strides}", "", "| task | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            for i, t in enumerate(tasks):
                row = []
                for j in range(len(tasks)):
                    per_level = [s["per_level"][str(lv)][i][j] for lv in s["levels"]]
                    extra = " [" + ", ".join(_num(x, ".2f") for x in per_level) + "]" if per_level else ""
                    row.append(_num(s["overall"][i][j], ".2f") + extra)
                lines.append(f"| {t} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


# ---- the figure ---------------------------------------------------------------------------------------------------
GATE_COLOUR, DROP_COLOUR = "#d9622b", "#2b5d9c"


def plot_gate_proof(ablation: dict[str, Any], agreement: dict[str, Any], extractors: list[str], path: Path) -> Path:
    """One panel per (gated variant, task): per extractor, the mean gate weight (left axis) beside its removal drop in
    points (right axis, zero lines aligned), ρ in the title; written atomically as a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(v, t, entry) for v, per in ablation.items() for t, entry in per.items()]
    tasks = list(dict.fromkeys(t for _, t, _ in panels))
    variants = list(ablation)
    fig = Figure(figsize=(max(3.2, 0.9 * len(extractors) + 1.6) * len(tasks), 2.8 * len(variants) + 0.6))
    axes = fig.subplots(len(variants), len(tasks), squeeze=False)
    x = np.arange(len(extractors))
    for v, t, entry in panels:
        ax = axes[variants.index(v)][tasks.index(t)]
        gate = [_or_nan(entry["extractors"].get(e, {}).get("gate")) for e in extractors]
        drop = [100 * _or_nan(entry["extractors"].get(e, {}).get("drop")) for e in extractors]
        ax.bar(x - 0.2, gate, width=0.4, color=GATE_COLOUR)
        right = ax.twinx()
        right.bar(x + 0.2, drop, width=0.4, color=DROP_COLOUR)
        finite = [d for d in drop if np.isfinite(d)] or [0.0]
        hi = max(max(finite), 0.1 * abs(min(finite)), 1.0) * 1.15  # at least 1 point: an all-zero drop stays flat
        lo = min(min(finite), 0.0) * 1.15
        right.set_ylim(lo, hi)
        ax.set_ylim(1.05 * lo / hi, 1.05)  # the two zero lines at the same height
        ax.set_yticks(np.linspace(0.0, 1.0, 6))
        right.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(x, extractors, fontsize=8)
        ax.set_ylabel("gate weight", color=GATE_COLOUR, fontsize=8)
        right.set_ylabel(f"drop ({entry['metric']} x100)", color=DROP_COLOUR, fontsize=8)
        rho = agreement.get(v, {}).get(t)
        ax.set_title(f"{v}: {t}, ρ = {'undefined' if rho is None else f'{rho:.2f}'}", fontsize=9)
    for row in axes:
        for ax in row:
            if not ax.has_data():
                ax.set_visible(False)
    fig.legend([Patch(color=GATE_COLOUR), Patch(color=DROP_COLOUR)],
               ["mean gate weight", "metric drop when the extractor is removed (points)"],
               loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
