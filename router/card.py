"""The model card (README.md) that `Router.save_pretrained` writes: Hub metadata, then what the model is made
of (tasks and classes, extractors with their specs and families, fusion and levels) and, when the caller
knows them, the gate weights per task and level and the metrics of the run that produced it.

``card_data`` (all keys optional; an unknown key is an error)::

    metrics:    {task: {metric: number}}              e.g. finetune's final evaluation (non-numbers are skipped)
    gate:       {task: {stride: {extractor: weight}}}  GateMeter.compute_levels(), or {task: {extractor: weight}}
    datasets:   [hub dataset id, ...] or {task: hub dataset id}   (a dict also gives Hub eval results)
    license:    a Hub license id, e.g. "apache-2.0"
    base_model: hub model id(s); default: those the extractor specs name (timm tags, hf repo ids)
    gate_image: a PNG file (e.g. compare's gate heatmap), copied next to the card as gate_heatmap.png; without
                it, a known `gate` is drawn there (:func:`plot_gate_panels`, the heatmap train/report.py draws too)
    model_id:   how users load it, in the usage snippet (push_to_hub sets the repo id)
    notes:      free text, printed under the title
    ablation:   {task: {extractor: {"drop": x, "only": y}}}  the task's metric with all extractors minus without this
                one, and with this one alone (train/experiments/gate_proof.py; card_gate_proof() picks a variant's from a comparison)
    agreement:  {task: rho or None}   Spearman rank correlation of the mean gate weights and those drops

>>> card = router_card(model.config, {n: e.info for n, e in model.extractors.items()}, saved=[], card_data={})
>>> card.data.library_name
'backbone-router'
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from backbone_router.extractors import ExtractorInfo
from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.extractors.io.figures import plot_gate_panels
from backbone_router.extractors.io.model_files import looks_like_path

from .config import RouterConfig

LIBRARY_NAME = "backbone-router"
GATE_IMAGE_NAME = "gate_heatmap.png"
CARD_KEYS = ("metrics", "gate", "datasets", "license", "base_model", "gate_image", "model_id", "notes", "ablation",
             "agreement")
ABLATION_KEYS = ("drop", "only")
PIPELINES = {"seg": "image-segmentation", "cls": "image-classification"}


def check_card_data(card_data: dict[str, Any] | None, config: RouterConfig) -> dict[str, Any]:
    """`card_data` with its keys and task / extractor names checked; errors name the key."""
    card_data = dict(card_data or {})
    if unknown := sorted(set(card_data) - set(CARD_KEYS)):
        raise ValueError(f"card_data: unknown key(s) {unknown}; expected some of {list(CARD_KEYS)}")
    tasks, names = [t.name for t in config.tasks], [e.name for e in config.extractors]
    for key in ("metrics", "gate", "ablation", "agreement"):
        if bad := sorted(set(card_data.get(key) or {}) - set(tasks)):
            raise ValueError(f"card_data.{key}: unknown task(s) {bad}; the model's tasks are {tasks}")
    for task, levels in (card_data.get("gate") or {}).items():
        for row in gate_rows(levels).values():
            if bad := sorted(set(row) - set(names)):
                raise ValueError(f"card_data.gate.{task}: unknown extractor(s) {bad}; the model's are {names}")
    check_ablation(card_data.get("ablation") or {}, card_data.get("agreement") or {}, names)
    datasets = card_data.get("datasets")
    if isinstance(datasets, dict) and (bad := sorted(set(datasets) - set(tasks))):
        raise ValueError(f"card_data.datasets: unknown task(s) {bad}; the model's tasks are {tasks}")
    image = card_data.get("gate_image")
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"card_data.gate_image: {image} does not exist")
    return card_data


def check_ablation(ablation: dict, agreement: dict, names: list[str]) -> None:
    """card_data's ablation ({task: {extractor: {drop, only}}}) and agreement ({task: rho}): known extractors and
    keys, numbers or None; errors name the key."""
    def number(x: Any) -> bool:
        return x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool))

    for task, per in ablation.items():
        if not isinstance(per, dict):
            raise ValueError(f"card_data.ablation.{task}: expected {{extractor: {{drop, only}}}}, got {per!r}")
        if bad := sorted(set(per) - set(names)):
            raise ValueError(f"card_data.ablation.{task}: unknown extractor(s) {bad}; the model's are {names}")
        for e, entry in per.items():
            if not isinstance(entry, dict) or set(entry) - set(ABLATION_KEYS) or not all(map(number, entry.values())):
                raise ValueError(f"card_data.ablation.{task}.{e}: expected {{drop, only}} numbers, got {entry!r}")
    for task, rho in agreement.items():
        if not number(rho) or (rho is not None and not -1.0 <= rho <= 1.0):
            raise ValueError(f"card_data.agreement.{task}: expected a rank correlation in [-1, 1] or null, got {rho!r}")


def gate_rows(levels: dict) -> dict[str, dict[str, float]]:
    """{stride: {extractor: w}} -> {"stride 8": {...}}; a flat {extractor: w} -> {"mean over levels": {...}}."""
    if levels and all(isinstance(v, dict) for v in levels.values()):
        return {f"stride {s}": dict(row) for s, row in levels.items()}
    return {"mean over levels": dict(levels)}


def card_gate_panels(gate: dict, tasks: list[str], extractors: list[str]) -> list[tuple[int | None, np.ndarray]]:
    """card_data's gate as heatmap panels: (stride, tasks x extractors) per level, finest first, when every task
    has per-level weights; else one (None, mean over levels) panel. NaN where a weight is unknown."""
    def matrix(rows: dict[str, dict[str, float]]) -> np.ndarray:
        return np.array([[float(rows.get(t, {}).get(e, math.nan)) for e in extractors] for t in tasks])

    per_level = {t: {int(s): row for s, row in levels.items()} for t, levels in gate.items()
                 if levels and all(isinstance(v, dict) for v in levels.values())}
    if len(per_level) == len(gate):
        strides = sorted({s for levels in per_level.values() for s in levels})
        return [(s, matrix({t: levels.get(s, {}) for t, levels in per_level.items()})) for s in strides]
    mean = {t: {e: float(np.mean([r[e] for r in gate_rows(levels).values() if e in r]))
                for e in extractors if any(e in r for r in gate_rows(levels).values())} for t, levels in gate.items()}
    return [(None, matrix(mean))]


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict (lists such as per-class values or curves are left to metrics.jsonl)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not k.startswith("_")}


def spec_base_models(config: RouterConfig) -> list[str]:
    """Hub model ids that the pretrained extractor specs name: ``timm:<name>.<tag>`` -> ``timm/<name>.<tag>``,
    ``timm:hf-hub:<id>`` and ``hf:<repo id>`` -> the id."""
    out = []
    for e in config.extractors:
        if not e.pretrained or e.checkpoint:
            continue
        backend, _, rest = e.spec.partition(":")
        if backend == "timm" and rest.startswith("hf-hub:"):
            out.append(rest.removeprefix("hf-hub:").split("@")[0])
        elif backend == "timm" and "." in rest and ":" not in rest:
            out.append(f"timm/{rest}")
        elif backend == "hf" and rest.count("/") == 1 and not looks_like_path(rest) and not Path(rest).exists():
            out.append(rest)
    return list(dict.fromkeys(out))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _deciding(config: RouterConfig, gate: dict | None, infos: dict[str, ExtractorInfo]) -> str:
    """The extractor with the largest weight averaged over the reported levels, and its family."""
    if config.fusion == "single":
        return f"{config.single} ({infos[config.single].family}, only)"
    if config.fusion != "gated":
        return f"all equally ({config.fusion})"
    if not gate:
        return "not measured"
    rows = list(gate_rows(gate).values())
    mean = {e: sum(r.get(e, 0.0) for r in rows) / len(rows) for e in infos}
    best = max(mean, key=mean.get)
    return f"{best} ({infos[best].family}, {mean[best]:.2f})"


def card_metadata(config: RouterConfig, card_data: dict[str, Any]) -> ModelCardData:
    """The Hub's YAML header: library, pipeline, tags, datasets, metrics, eval results, license, base models."""
    types_ = [t.type for t in config.tasks]
    pipeline = PIPELINES["seg"] if "seg" in types_ else PIPELINES["cls"]
    backends = sorted({e.spec.split(":", 1)[0] for e in config.extractors if ":" in e.spec})
    tags = [LIBRARY_NAME, *sorted({PIPELINES[t] for t in types_}), f"fusion-{config.fusion}", *backends]
    metrics = {t: scalar_metrics(m) for t, m in (card_data.get("metrics") or {}).items()}
    datasets = card_data.get("datasets")
    by_task = datasets if isinstance(datasets, dict) else {}
    eval_results = [
        EvalResult(task_type=PIPELINES[config.task(t).type], task_name=t, dataset_type=by_task[t],
                   dataset_name=by_task[t], metric_type=name, metric_name=name, metric_value=round(value, 4))
        for t, values in metrics.items() if t in by_task for name, value in values.items()
    ]
    base = card_data.get("base_model", spec_base_models(config))
    return ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag=pipeline, tags=tags, license=card_data.get("license"),
        datasets=sorted(set(by_task.values())) if by_task else (list(datasets) if datasets else None),
        metrics=sorted({n for values in metrics.values() for n in values}) or None,
        base_model=base or None, model_name=(card_data.get("model_id") or "backbone-router model") if eval_results else None,
        eval_results=eval_results or None,
    )


def router_card(config: RouterConfig, infos: dict[str, ExtractorInfo], saved: list[str],
                card_data: dict[str, Any] | None = None) -> ModelCard:
    """The model card of a Router: metadata header + tasks, extractors, routing, gate and metrics sections.

    Args:
        config: the model's RouterConfig.
        infos: extractor name -> its ExtractorInfo (resolved family, widths, strides).
        saved: the extractors whose weights are in model.safetensors.
        card_data: optional facts from the run (see the module docstring).
    """
    card_data = check_card_data(card_data, config)
    gates, metrics = card_data.get("gate") or {}, card_data.get("metrics") or {}
    model_id = card_data.get("model_id") or "<this repo id or folder>"
    c, g = config, config.gate
    first = c.tasks[0]
    parts = [
        f"# {card_data.get('model_id') or 'backbone-router model'}",
        card_data.get("notes", "").strip(),
        f"A backbone-router model: {len(c.extractors)} extractor(s) aligned to a pyramid of "
        f"levels (strides {c.strides}), weighed per task and level by `{c.fusion}` fusion, and shared heads for "
        f"{len(c.tasks)} task(s).",
        "## Use\n\n```python\nfrom backbone_router import Router\n\n"
        f"model = Router.from_pretrained({model_id!r})\n"
        f"out = model.predict(images, task={first.name!r})  # images: file paths, PIL, NumPy or tensors; "
        + ("[{'mask': H x W class indices, 'classes': names}, ...]" if first.type == "seg"
           else "[[{'label': name, 'score': p}, ...], ...]") + "\n```",
        "## Tasks\n\n" + _table(
            ["task", "type", "classes", "decided by (gate: extractor, family, weight)", "metrics"],
            [[t.name, t.type, ", ".join(t.classes), _deciding(c, gates.get(t.name), infos),
              ", ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics.get(t.name, {})).items()) or "n/a"]
             for t in c.tasks]),
        "## Extractors\n\n" + _table(
            ["name", "spec", "family", "layers", "widths", "strides", "weights"],
            [[e.name, f"`{e.spec}`", infos[e.name].family, list(infos[e.name].layers), list(infos[e.name].widths),
              list(infos[e.name].strides),
              "in model.safetensors" if e.name in saved else f"from the spec{' + ' + e.checkpoint if e.checkpoint else ''}"]
             for e in c.extractors]),
        "## Fusion and levels\n\n" + "\n".join([
            f"- fusion: `{c.fusion}`" + (f" (extractor `{c.single}`)" if c.fusion == "single" else ""),
            f"- levels (strides): {c.strides}, widths {c.widths}",
            f"- detail path: {'yes' if c.has_detail else 'no'}; top-down decoder: "
            + (f"yes (`{c.head.decoder_block}` blocks, head reads the fuse of all levels)" if len(c.strides) > 1
               else "no (one level)")
            + (f"; refined to stride {c.head.refine[-1]} with the detail maps at {c.head.refine}" if c.head.refine else "")
            + (f"; trained with an auxiliary stride-16 seg head (weight {c.head.aux_weight}"
               + (", on classification's every-tap map)" if c.cls_reads_all_taps else ")") if c.has_aux_head else ""),
            *(["- classification reads " + (f"every tap resampled onto the stride-{c.strides[c.cls_level]} grid "
                                             "(`cls_taps: all`)" if c.cls_reads_all_taps
                                             else f"the stride-{c.strides[c.cls_level]} level")]
              if any(t.type == "cls" for t in c.tasks) else []),
            *([f"- gate: granularity `{g.granularity}`, content `{g.content}`, combine `{g.combine}`, top-k "
               f"{g.top_k or 'all'}" + (" (the same at every level)" if g.top_k and len(c.strides) > 1 else "")
               + f", temperature {g.temperature}, task embedding `{g.task_embedding}`"
               + (f" from `{g.text_encoder}`" if g.task_embedding == "text" else "")] if c.fusion == "gated" else []),
        ]),
    ]
    if gates or card_data.get("gate_image"):
        section = ["## Gate", "Mean gate weight per extractor (columns: name and family) at each level."]
        if card_data.get("gate_image") or any(gates.values()):  # given, or drawn by write_card
            section.append(f"![gate weights per task and level]({GATE_IMAGE_NAME})")
        names = [e.name for e in c.extractors]
        for task, levels in gates.items():
            section.append(f"**{task}**\n\n" + _table(
                ["level", *[f"{n} ({infos[n].family})" for n in names]],
                [[lv, *[f"{row[n]:.3f}" if n in row else "n/a" for n in names]] for lv, row in gate_rows(levels).items()]))
        parts.append("\n\n".join(section))
    if card_data.get("ablation") or card_data.get("agreement"):
        parts.append(_ablation_section(card_data.get("ablation") or {}, card_data.get("agreement") or {},
                                       [e.name for e in c.extractors], infos))
    if any(scalar_metrics(m) for m in metrics.values()):
        rows = [[t, k, f"{v:.4f}"] for t, m in metrics.items() for k, v in scalar_metrics(m).items()]
        parts.append("## Metrics\n\n" + _table(["task", "metric", "value"], rows))
    body = "\n\n".join(p for p in parts if p)
    return ModelCard(f"---\n{card_metadata(config, card_data).to_yaml()}\n---\n\n{body}\n")


def _ablation_section(ablation: dict, agreement: dict, names: list[str], infos: dict[str, ExtractorInfo]) -> str:
    """The card's gate check: per task, each extractor's metric drop when removed and its metric alone (x100), and
    the rank agreement of gate and drop."""
    def points(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(100 * x, fmt)

    def cell(entry: dict | None) -> str:
        return "n/a" if not entry else f"{points(entry.get('drop'), '+.1f')} / {points(entry.get('only'), '.1f')}"

    tasks = list(dict.fromkeys([*ablation, *agreement]))
    rows = [[t, *[cell(ablation.get(t, {}).get(n)) for n in names],
             "n/a" if agreement.get(t) is None else f"{agreement[t]:.2f}"] for t in tasks]
    return "\n\n".join([
        "## Gate check (ablation)",
        "Each extractor removed at evaluation (the kept gate weights renormalised): the task's metric x100 with all "
        "extractors minus without it (drop) / with it alone (only); ρ: Spearman rank correlation of the mean gate "
        "weights and the drops (n/a: undefined).",
        _table(["task", *[f"{n} ({infos[n].family}) drop / only" for n in names], "ρ(gate, drop)"], rows)])


def write_card(directory: Path, card: ModelCard, card_data: dict[str, Any] | None, config: RouterConfig,
               infos: dict[str, ExtractorInfo]) -> None:
    """README.md and the gate heatmap it shows (card_data's gate_image, else drawn from its gate) into `directory`,
    each written atomically."""
    card_data = card_data or {}
    atomic_write_bytes(directory / "README.md", str(card).encode())
    gates = {t.name: card_data["gate"][t.name] for t in config.tasks if (card_data.get("gate") or {}).get(t.name)}
    if card_data.get("gate_image"):
        atomic_write_bytes(directory / GATE_IMAGE_NAME, Path(card_data["gate_image"]).read_bytes())
    elif gates:
        names = [e.name for e in config.extractors]
        plot_gate_panels(card_gate_panels(gates, list(gates), names), list(gates), names,
                         {n: infos[n].family for n in names}, card_data.get("model_id") or "this model",
                         directory / GATE_IMAGE_NAME)
