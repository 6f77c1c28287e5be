"""A comparison's results per (variant, seed), on disk the moment they are done: what is done, what is missing.

``<output_dir>/results/<variant>/seed_<seed>.json`` holds one trained pair: its metric, gate, sweep and ablation
rows (:mod:`train.experiments.gate_proof`; files from before them have none, and report as before), its training seconds and the
settings that produced it (the resolved config less what cannot change a number, plus the variant's own model
section). Each file is written atomically, so a crash, a kill or a timeout loses at most the
pairs in training, and a pair trained under other settings is never mixed into a run: it is an error naming the
keys that differ.

Processes of one comparison do not wait for each other at a collective while one of them trains: the main process
publishes the plan (which seeds still miss a pair) in a file once the frozen features are cached, and waits for the
other processes' result files at the end (:meth:`ResultStore.wait`), so uneven work (3 seeds on 2 processes) cannot
run into the process-group timeout. ``train/compare.py --resume`` trains the seeds that still miss a pair (all
variants of such a seed, on the same batches, so the numbers equal those of an uninterrupted run) and
:func:`collect` builds a report from whatever is done, naming what is missing.

>>> import tempfile
>>> store = ResultStore(Path(tempfile.mkdtemp()), {"train": {"lr": 0.001}}, {"concat": {"fusion": "concat"}})
>>> store.save("concat", 0, [{"variant": "concat", "seed": 0, "task": "t", "metric": "m", "value": 0.5}], [], [], 1.0)
>>> store.missing([0, 1])
[('concat', 1)]
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.router.config import FORMAT_VERSION, RouterConfig
from backbone_router.train.training.config import config_differences
from backbone_router.train.training.errors import RunError
from backbone_router.train.training.metrics import json_safe

RESULTS_DIR = "results"
# What cannot change any number of a pair: where the feature cache lives, threads, the feature batch, loader
# workers, and which seeds and variants this invocation runs. They may differ between a run and its --resume.
# compare.ablation only adds rows (a pair without them reports without them), so runs from before it resume too.
NEUTRAL_KEYS = ("compare.seeds", "compare.variants", "compare.cache_dir", "compare.threads",
                "compare.feature_batch_size", "data.num_workers", "compare.ablation")


def pair_settings(resolved: dict[str, Any], variant_model: dict[str, Any]) -> dict[str, Any]:
    """The settings one (variant, seed) result depends on: the resolved config less NEUTRAL_KEYS, plus its model."""
    settings = copy.deepcopy(resolved)
    for key in NEUTRAL_KEYS:
        node = settings
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    settings["variant_model"] = copy.deepcopy(variant_model)
    return json.loads(json.dumps(json_safe(settings)))  # as it reads back from the file


def current_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A pair's saved settings with its model sections (`model`, `variant_model`) of an older format as they load now
    (:meth:`router.config.RouterConfig.from_dict` upgrades them), so a comparison resumes across a format change."""
    out = dict(settings)
    for key in ("model", "variant_model"):
        model = out.get(key)
        if isinstance(model, dict) and isinstance(model.get("format_version"), int) and model["format_version"] < FORMAT_VERSION:
            kind = {"kind": model["kind"]} if "kind" in model else {}
            new = RouterConfig.from_dict({k: v for k, v in model.items() if k != "kind"}, where=f"settings.{key}")
            out[key] = json.loads(json.dumps(json_safe({**kind, **new.to_dict()})))
    return out


class ResultStore:
    """The per-pair result files of one comparison output dir."""

    def __init__(self, output_dir: Path, resolved: dict[str, Any], variant_models: dict[str, dict[str, Any]]):
        self.root = Path(output_dir) / RESULTS_DIR
        self.variants = list(variant_models)
        self.settings = {v: pair_settings(resolved, m) for v, m in variant_models.items()}

    @classmethod
    def from_dir(cls, output_dir: Path) -> tuple[ResultStore, dict[str, Any]]:
        """The store of a comparison output dir and its report meta, as saved when its training began."""
        path = Path(output_dir) / RESULTS_DIR / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; is {output_dir} a train/compare.py output dir that got to training?")
        saved = json.loads(path.read_text())
        store = cls.__new__(cls)
        store.root, store.settings = path.parent, saved["settings"]
        store.variants = list(store.settings)
        return store, saved["meta"]

    def save_meta(self, meta: dict[str, Any]) -> None:
        """The report meta (tasks, variants, budget, ...) and the settings of every variant, for :func:`load_partial`."""
        atomic_write_bytes(self.root / "meta.json", json.dumps(json_safe({"meta": meta, "settings": self.settings})).encode())

    def path(self, variant: str, seed: int) -> Path:
        return self.root / variant / f"seed_{seed}.json"

    def save(self, variant: str, seed: int, rows: list[dict], gate_rows: list[dict], sweep_rows: list[dict],
             train_s: float, ablation_rows: list[dict] | None = None) -> Path:
        """Write this pair's rows (those of `rows` / `gate_rows` / `sweep_rows` / `ablation_rows` with its variant
        and seed)."""
        mine = [[r for r in rs if r["variant"] == variant and r["seed"] == seed]
                for rs in (rows, gate_rows, sweep_rows, ablation_rows or [])]
        record = {"variant": variant, "seed": seed, "rows": mine[0], "gates": mine[1], "sweeps": mine[2],
                  "ablation": mine[3], "train_s": train_s, "settings": self.settings[variant]}
        path = self.path(variant, seed)
        atomic_write_bytes(path, json.dumps(json_safe(record)).encode())
        return path

    def load(self, variant: str, seed: int) -> dict[str, Any] | None:
        """A pair's record, None when it is not done; a record of other settings is an error naming the keys."""
        path = self.path(variant, seed)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: not a readable result ({e}); delete it to train that pair again") from e
        try:
            saved = current_settings(record.get("settings") or {})
        except (TypeError, ValueError) as e:  # a model of an older format that no longer loads (a removed option)
            raise RunError(f"{path}: {e}") from e
        if saved != self.settings[variant]:
            differ = config_differences(saved, self.settings[variant])
            raise RunError(f"{path} was trained with other settings (they differ in {differ[:8]}); resume with the "
                           "settings of that run, or start afresh with --overwrite or another --output-dir")
        return record

    def missing(self, seeds: Sequence[int]) -> list[tuple[str, int]]:
        """The (variant, seed) pairs not done yet, in seed-major order."""
        return [(v, s) for s in seeds for v in self.variants if self.load(v, s) is None]

    def seeds_to_train(self, seeds: Sequence[int]) -> list[int]:
        """Seeds with a pair missing: all their variants train again, side by side on the same batches."""
        todo = {s for _, s in self.missing(seeds)}
        return [s for s in seeds if s in todo]

    def wait(self, seeds: Sequence[int], poll_s: float = 1.0, say=print) -> None:
        """Block until every pair is done (the other processes write theirs); no collective is involved.

        A process that fails takes the launch down (torchrun stops the others), so this never waits on a dead run.
        """
        told = None
        while missing := self.missing(seeds):
            if told != missing:
                say(f"waiting for {len(missing)} result(s) of the other processes: {missing[:6]}")
                told = missing
            time.sleep(poll_s)


def collect(store: ResultStore, seeds: Sequence[int]) -> dict[str, Any]:
    """The rows of every finished pair (ablation rows: none in a file from before them), the training seconds per
    variant, and the missing pairs."""
    rows, gates, sweeps, ablation, train_s, missing = [], [], [], [], {v: 0.0 for v in store.variants}, []
    for seed in seeds:
        for v in store.variants:
            record = store.load(v, seed)
            if record is None:
                missing.append((v, seed))
                continue
            rows += record["rows"]
            gates += record["gates"]
            sweeps += record["sweeps"]
            ablation += record.get("ablation", [])
            train_s[v] += record["train_s"]
    return {"rows": rows, "gates": gates, "sweeps": sweeps, "ablation": ablation, "train_s": train_s,
            "missing": missing}


def load_partial(output_dir: Path) -> tuple[list[dict], list[dict], list[dict], list[dict], dict[str, Any]]:
    """Metric, gate, sweep and ablation rows of every finished pair of a comparison, and its meta; a note per
    variant names the seeds it misses (a run that crashed, was killed or is still training)."""
    store, meta = ResultStore.from_dir(output_dir)
    done = collect(store, meta["seeds"])
    meta = {**meta, "notes": {**meta.get("notes", {}), **missing_notes(done["missing"])},
            "missing": [list(p) for p in done["missing"]]}
    meta.setdefault("timings_s", {})["train_per_variant"] = done["train_s"]
    return done["rows"], done["gates"], done["sweeps"], done["ablation"], meta


def missing_notes(missing: list[tuple[str, int]]) -> dict[str, str]:
    """Per variant, a note for the report naming the seeds it still misses."""
    by_variant: dict[str, list[int]] = {}
    for v, s in missing:
        by_variant.setdefault(v, []).append(s)
    return {v: f"not finished: seed(s) {ss} missing (a partial report; `compare.py --resume` trains them)"
            for v, ss in by_variant.items()}


# ---- the plan: published by the main process once the features are cached ------------------------------------------
def plan_path(output_dir: Path, token: str) -> Path:
    return Path(output_dir) / RESULTS_DIR / f".plan-{token}.json"


def publish_plan(output_dir: Path, token: str, seeds: list[int]) -> None:
    """The seeds this invocation trains, for the other processes (the file is unique to this run: its token)."""
    atomic_write_bytes(plan_path(output_dir, token), json.dumps({"seeds": seeds}).encode())


def read_plan(output_dir: Path, token: str, poll_s: float = 0.5) -> list[int]:
    """Wait for the main process's plan (it fills the feature cache first) and return its seeds."""
    path = plan_path(output_dir, token)
    while not path.is_file():
        time.sleep(poll_s)
    return json.loads(path.read_text())["seeds"]


def remove_plan(output_dir: Path, token: str) -> None:
    plan_path(output_dir, token).unlink(missing_ok=True)
