"""Speed and memory benchmark: each single extractor vs the routed model vs routed top-1, side by side.

One run measures, for every batch size and resolution asked for:

* inference (eval, ``inference_mode``): each bare extractor, the routed model (all extractors + alignment +
  gate + fusion + head) and routed top-1 (gate ``top_k = 1``; once as the gate chooses, and once with the
  choice forced onto each extractor, so every "top-1 / chosen single" ratio is measured), and the router
  alone on each extractor's precomputed features (``router_only->X``: gate, alignment, fusion and head, a
  direct measurement of what top-1 adds to X, less noisy than the difference of two totals);
* a training step (forward, loss, backward, AdamW step of train/training/optim.py) of the single-extractor router
  (``fusion: single``) and of the routed model, frozen extractors as configured;
* images/s (median over repetitions after warm-up), peak memory, FLOPs (``FlopCounterMode``), and MFU when
  ``--peak-tflops`` is given;

then the epoch time of head training on frozen features (the disk cache of ``train/experiments/feature_cache.py``,
read back every step) versus recomputing the features, an audit of
host-device syncs in the training step, and (``--ablate``) each speed option measured off and on.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call. On CPU the
Linux peak resident set size: ``malloc_trim(0)`` returns freed heap to the OS, ``/proc/self/clear_refs``
(``5``) resets the high-water mark to the current RSS, and the figure is ``VmHWM`` after one call minus
``VmRSS`` before it (``tracemalloc`` does not see tensor storage, so it is not used).

With ``--train-step`` (:func:`run_step_benchmark`, issue 28) it measures instead the training step of a comparison
variant from cached frozen features (forward, loss, backward, clipping, optimizer: the step of
``Comparison.train_seed``) next to the smp U-Net peers at the same batch and crop, with each part's time from
``torch.profiler`` (record_function ranges set by module hooks: align, gate, fuse, detail, decoder, heads, encoder,
loss, backward, clip, optimizer) and FLOPs (``FlopCounterMode`` by module), the agreement and speed of bf16 autocast
and channels_last on the routed step, and the AdamW implementations' step time.

The library behind ``train/benchmark.py`` (its command line): :func:`run_benchmark` runs every measurement.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import gc
import inspect
import json
import os
import platform
import statistics
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from backbone_router.extractors import create_extractor  # noqa: E402
from backbone_router.heads import build_loss  # noqa: E402
from backbone_router.router import Router, RouterConfig  # noqa: E402
from backbone_router.train.training.config import apply_override  # noqa: E402

GOALS = {  # name -> (target, "<=" or ">=")
    "routed_over_sum_of_singles": (1.05, "<="),
    "top1_over_single": (1.05, "<="),
    "cache_speedup": (20.0, ">="),
}
OPTIONS = ("bf16", "channels_last", "sdpa", "compile")


# ---- settings ------------------------------------------------------------------------------------
def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # the vector ISA torch's CPU kernels use (AVX2, AVX512): with the name below, which kind of CPU a time
            # came from (the routed / U-Net step ratio was 0.41 on an AMD EPYC with AVX2, 0.55 on an Intel Xeon)
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- measurement primitives ------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_memory_mib(fn, device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one call above the memory in use before it, and the method used."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda.max_memory_allocated"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - base) / 1024, "linux peak RSS (malloc_trim + clear_refs 5, VmHWM - VmRSS)"
    except (OSError, StopIteration, AttributeError):
        fn()
        return None, "unavailable (needs Linux /proc)"


def count_flops(fn) -> int:
    """FLOPs of one call (matmuls and convolutions, 2 per multiply-add), from FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# The benchmark script and this module only drive the step: their lines are never blamed.
AUDIT_DRIVERS = {Path(__file__).resolve(), REPO / "train" / "benchmark.py"}
SYNC_CALLS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"}


PACKAGE_DIRS = ("extractors", "router", "heads", "train")


def repo_line(frame) -> str | None:
    """'router/model.py:123' when `frame` runs this package's own source (not an audit driver, not a
    virtual environment that happens to live inside the checkout, as CI's .ci-venv does); else None."""
    path = Path(frame.filename).resolve()
    if REPO not in path.parents or path in AUDIT_DRIVERS:
        return None
    rel = path.relative_to(REPO)
    return f"{rel}:{frame.lineno}" if rel.parts[0] in PACKAGE_DIRS else None


class HostSyncAudit(TorchFunctionMode):
    """Records tensor calls that wait for the device (item, tolist, bool(tensor), .cpu(), nonzero, list
    indices, which are copied host -> device) with the repository line that made them."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        flagged = name in SYNC_CALLS
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            flagged = any(isinstance(i, list) for i in index)
            name = f"{name} with a list index"
        if flagged:
            self.calls[f"{name} at {self._caller()}"] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str:
        for frame in inspect.stack()[2:]:
            if where := repo_line(frame):
                return where
        frame = inspect.stack()[2]
        parts = Path(frame.filename).parts
        where = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else frame.filename
        return f"{where}:{frame.lineno} (a library)"


# ---- the model in each mode ------------------------------------------------------------------------
@contextmanager
def router_mode(model: Router, mode: str, extractor: str | None = None):
    """Temporarily run `model` as ``single`` (one extractor), ``routed`` or ``top1`` (gate top_k = 1;
    with `extractor`, the gate's choice is forced onto it by a large logit bias: same cost, known choice)."""
    cfg = model.config
    saved = (cfg.fusion, cfg.single, cfg.gate.top_k)
    bias = None
    try:
        if mode == "single":
            cfg.fusion, cfg.single = "single", extractor
        elif mode == "top1":
            cfg.gate.top_k = 1
            if extractor is not None:
                bias = model.gate.mlp[-1].bias
                saved_bias = bias.detach().clone()
                with torch.no_grad():
                    bias.view(len(cfg.strides), -1)[:, model.extractor_names.index(extractor)] += 1e4  # every level
        yield model
    finally:
        cfg.fusion, cfg.single, cfg.gate.top_k = saved
        if bias is not None:
            with torch.no_grad():
                bias.copy_(saved_bias)


def set_sdpa(model: torch.nn.Module, on: bool) -> int:
    """Switch timm's fused attention (F.scaled_dot_product_attention) on or off; returns modules switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on
            n += 1
    return n


class Settings:
    """The speed options of one measurement: autocast, memory format, SDPA, compile."""

    compile_backend = "inductor"  # torch.compile backend ("eager": graph capture only, no code generation)

    def __init__(self, device: torch.device, bf16=False, channels_last=False, sdpa=True, compile=False):
        self.device, self.bf16, self.channels_last, self.sdpa, self.compile = device, bf16, channels_last, sdpa, compile

    def flipped(self, option: str) -> Settings:
        s = copy.copy(self)
        setattr(s, option, not getattr(s, option))
        return s

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in OPTIONS}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def prepare(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        set_sdpa(model, self.sdpa)
        return images.contiguous(memory_format=fmt)

    def wrap(self, fn):
        """The callable itself, or torch.compile of it (compiled once per model and mode)."""
        if not self.compile:
            return fn
        # Extractor.forward counts its calls in an int attribute, which dynamo treats as a constant by default:
        # every call would recompile (and, past the cache limit, silently run eager).
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        return torch.compile(fn, backend=self.compile_backend)


# ---- workloads ---------------------------------------------------------------------------------
def make_target(model: Router, task: str, images: torch.Tensor) -> torch.Tensor:
    tcfg = model.config.task(task)
    b, (h, w) = images.shape[0], images.shape[-2:]
    shape = (b, h, w) if tcfg.type == "seg" else (b,)
    return torch.randint(0, tcfg.num_classes, shape, device=images.device)


def inference_fn(module, images, settings: Settings, task: str | None = None):
    call = settings.wrap(module)

    def run():
        with torch.inference_mode(), settings.autocast():
            return call(images) if task is None else call(images, task)

    return run


def features_fn(model: Router, images, settings: Settings, task: str, features: dict):
    """Routed inference on precomputed extractor outputs: only the router's own modules run."""
    call = settings.wrap(model)

    def run():
        with torch.inference_mode(), settings.autocast():
            return call(images, task, features=features)

    return run


def train_step_fn(model: Router, task: str, images, target, settings: Settings, features=None):
    """Forward, the project's loss (ce) + gate aux loss, backward, AdamW step, zero_grad."""
    loss_fn = build_loss("ce")
    from backbone_router.train.training.config import TrainConfig
    from backbone_router.train.training.optim import make_optimizer

    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=1e-4))
    key = "seg" if model.config.task(task).type == "seg" else "cls"
    forward = settings.wrap(model)

    def step(feats=None, imgs=None, tgt=None):
        with settings.autocast():
            out = forward(images if imgs is None else imgs, task, features=features if feats is None else feats)
            loss = loss_fn(out[key], target if tgt is None else tgt)["loss"] + out["aux_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@contextmanager
def restored_weights(model: torch.nn.Module):
    """Training steps change the trainable weights; put them back so every mode sees the same model."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def setup(fn) -> None:
    """Run a workload's untimed `setup` (e.g. switching the model's memory format), if it has one."""
    getattr(fn, "setup", lambda: None)()


def interleaved_seconds(fns: dict, device: torch.device, warmup: int, reps: int) -> dict[str, dict]:
    """Median (and quartiles) per workload, timed round-robin (one call of each per repetition), so that
    load from other processes on a shared machine falls on every workload alike and ratios stay fair."""
    for fn in fns.values():
        setup(fn)
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            setup(fn)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[key].append(time.perf_counter() - t0)
    out = {}
    for key, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[key] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "reps": reps}
    return out


def measure_all(fns: dict, args) -> dict[str, dict]:
    """Time (interleaved), peak memory and FLOPs of each workload; MFU when --peak-tflops is given."""
    results = interleaved_seconds(fns, args.device_, args.warmup, args.reps)
    for key, fn in fns.items():
        r = results[key]
        setup(fn)
        r["peak_mem_mib"], r["mem_method"] = peak_memory_mib(fn, args.device_)
        setup(fn)
        r["flops"] = count_flops(fn)
        r["tflops_per_s"] = r["flops"] / r["median_s"] / 1e12
        r["mfu"] = r["tflops_per_s"] / args.peak_tflops if args.peak_tflops else None
    return results


def in_mode(model: Router, fn, mode: str, extractor: str | None = None):
    """`fn` run with the model temporarily in `mode` (see router_mode)."""

    def run():
        with router_mode(model, mode, extractor):
            return fn()

    return run


def measure_size(model: Router, task: str, batch: int, res: int, settings: Settings, args, rows: list) -> dict:
    """Every workload at one batch size and resolution; returns the ratios measured there."""
    torch.manual_seed(args.seed)
    images = settings.prepare(model, torch.rand(batch, 3, res, res, device=args.device_))
    names = model.extractor_names
    gated = model.config.fusion == "gated"

    def add(workload, phase, r, **extra):
        rows.append({"workload": workload, "phase": phase, "batch": batch, "resolution": res,
                     "images_per_s": batch / r["median_s"], **r, **extra, "settings": settings.as_dict()})

    # Inference: bare extractors, routed, top-1 as the gate chooses and forced onto each extractor.
    routed_fn = inference_fn(model, images, settings, task)
    fns = {f"single:{n}": inference_fn(model.extractors[n], images, settings) for n in names}
    fns["routed"] = routed_fn
    ran = {}
    if gated:
        fns["routed_top1"] = in_mode(model, routed_fn, "top1")
        ran["routed_top1"] = [names[i] for i in fns["routed_top1"]()["ran"].nonzero().flatten().tolist()]
        for n in names:
            fns[f"routed_top1->{n}"] = in_mode(model, routed_fn, "top1", n)
            ran[f"routed_top1->{n}"] = [names[i] for i in fns[f"routed_top1->{n}"]()["ran"].nonzero().flatten().tolist()]
        # The router's own work (gate, alignment, fusion, heads) with the chosen extractor's features given:
        # a direct measurement of the overhead, instead of the difference of two noisy totals.
        for n in names:
            with torch.inference_mode(), settings.autocast():
                feats = {n: model.extractors[n](images)}
            fns[f"router_only->{n}"] = in_mode(model, features_fn(model, images, settings, task, feats), "top1", n)
    res_inf = measure_all(fns, args)
    for key, r in res_inf.items():
        add(key, "inference", r, **({"ran": ran[key]} if key in ran else {}))
    t = {k: r["median_s"] for k, r in res_inf.items()}
    ratios = {"batch": batch, "resolution": res,
              "routed_over_sum_of_singles": t["routed"] / sum(t[f"single:{n}"] for n in names)}
    if gated:
        ratios["top1_ran"] = ran["routed_top1"]
        ratios["top1_over_single"] = t["routed_top1"] / sum(t[f"single:{n}"] for n in ran["routed_top1"])
        ratios["top1_forced_over_single"] = {n: t[f"routed_top1->{n}"] / t[f"single:{n}"] for n in names}
        ratios["top1_over_single_worst"] = max(ratios["top1_forced_over_single"].values())
        ratios["router_only_over_single"] = {n: t[f"router_only->{n}"] / t[f"single:{n}"] for n in names}

    # Training step: the single-extractor router (fusion: single) per extractor, and the routed model.
    if not args.no_train:
        target = make_target(model, task, images)
        model.train()
        with restored_weights(model):
            fns = {f"single:{n}": in_mode(model, train_step_fn(model, task, images, target, settings), "single", n)
                   for n in names}
            fns["routed"] = train_step_fn(model, task, images, target, settings)
            res_train = measure_all(fns, args)
        model.eval()
        for key, r in res_train.items():
            add(key, "train_step", r)
        ratios["train_routed_over_sum_of_singles"] = res_train["routed"]["median_s"] / sum(
            res_train[f"single:{n}"]["median_s"] for n in names)
    return ratios


def prepared(model: Router, settings: Settings, images: torch.Tensor, fn, train: bool = False):
    """`fn` with an untimed `setup` that puts the model in `settings` (memory format, SDPA) and mode."""

    def setup():
        settings.prepare(model, images)
        model.train(train)

    def run():
        return fn()

    run.setup = setup
    return run


# ---- frozen-feature cache --------------------------------------------------------------------------
def feature_reader(model: Router, batches: list[torch.Tensor], res: int, cache_dir: str | None):
    """Fills the disk frozen-feature cache (train/experiments/feature_cache.py) and returns a reader of batch i's features."""
    import tempfile

    from backbone_router.train.experiments.feature_cache import FeatureCache

    root = cache_dir or tempfile.mkdtemp(prefix="bench_feature_cache_")
    cache = FeatureCache(root)
    frozen = [n for n, e in model.extractors.items() if not any(p.requires_grad for p in e.parameters())]
    ids = [[f"bench/{i}_{j}" for j in range(x.shape[0])] for i, x in enumerate(batches)]
    transform = f"bench:{res}x{res}"
    with torch.no_grad():
        for i, x in enumerate(batches):
            for n in frozen:
                cache.get_or_compute(model.extractors[n], ids[i], x, transform=transform)

    def read(i: int) -> dict:  # every entry is cached: images=None, so a miss would raise
        return {n: {k: v.to(batches[i].device) if torch.is_tensor(v) else [d.to(batches[i].device) for d in v]
                    for k, v in cache.get_or_compute(model.extractors[n], ids[i], None, transform=transform).items()}
                for n in frozen}

    return read, f"disk (train/experiments/feature_cache.py at {root})"


def cache_epochs(model: Router, task: str, args, settings: Settings) -> dict:
    """Epoch time of head training with frozen features from the cache versus recomputing them."""
    batch, res = args.batch_sizes[0], args.resolutions[0]
    torch.manual_seed(args.seed)
    batches = [settings.prepare(model, torch.rand(batch, 3, res, res, device=args.device_)) for _ in range(args.cache_batches)]
    targets = [make_target(model, task, x) for x in batches]
    t0 = time.perf_counter()
    read, source = feature_reader(model, batches, res, args.cache_dir)
    synchronize(args.device_)
    fill_s = time.perf_counter() - t0
    model.train()
    with restored_weights(model):
        step = train_step_fn(model, task, batches[0], targets[0], settings)

        def epoch(cached: bool):
            for i, (x, y) in enumerate(zip(batches, targets)):
                step(imgs=x, tgt=y, feats=read(i) if cached else {})

        reps = max(1, min(args.reps, 3))
        t = interleaved_seconds({"recompute": lambda: epoch(False), "cached": lambda: epoch(True)},
                                args.device_, 1, reps)
        recompute, cached = t["recompute"], t["cached"]
    model.eval()
    return {"batch": batch, "resolution": res, "batches_per_epoch": args.cache_batches, "source": source,
            "cache_fill_s": fill_s, "epoch_recompute_s": recompute["median_s"], "epoch_cached_s": cached["median_s"],
            "reps": reps, "cache_speedup": recompute["median_s"] / cached["median_s"]}


# ---- host-device sync audit --------------------------------------------------------------------------
def sync_audit(model: Router, task: str, args, settings: Settings) -> dict:
    """Tensor calls that would block the host on an accelerator, in one training step and one inference."""
    res = args.resolutions[0]
    images = settings.prepare(model, torch.rand(2, 3, res, res, device=args.device_))
    target = make_target(model, task, images)
    out = {}
    model.train()
    with restored_weights(model):
        for mode in ("routed", "single"):
            with router_mode(model, mode, model.extractor_names[0]):
                step = train_step_fn(model, task, images, target, Settings(args.device_, bf16=settings.bf16))
                with HostSyncAudit() as audit:
                    step()
                out[f"train_step_{mode}"] = dict(audit.calls)
    model.eval()
    if model.config.fusion == "gated":
        with router_mode(model, "top1"), HostSyncAudit() as audit, torch.inference_mode():
            model(images, task)
        out["inference_top1"] = dict(audit.calls)
        # The top-1 decision: the gate alone (pixel stem + MLP), the part that must finish before the sync.
        gate_fn = inference_fn(lambda x: model.gate(task, x.shape[0], (res // 16, res // 16), images=x), images, settings)
        out["gate_decision_s"] = interleaved_seconds({"gate": gate_fn}, args.device_, args.warmup, args.reps)["gate"]["median_s"]
    if args.device_.type == "cuda":  # the CUDA runtime's own check, on top of the static audit
        torch.cuda.set_sync_debug_mode("warn")
        model.train()
        with restored_weights(model):
            train_step_fn(model, task, images, target, settings)()
        model.eval()
        torch.cuda.set_sync_debug_mode("default")
    return out


# ---- report -----------------------------------------------------------------------------------------
def goals(summary: dict) -> dict:
    out = {}
    for key, (target, op) in GOALS.items():
        value = summary.get(key)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[key] = {"value": value, "target": f"{op} {target}", "met": met}
    return out


def print_table(rows: list[dict], summary: dict) -> None:
    head = f"{'workload':<24} {'phase':<10} {'batch':>5} {'res':>4} {'median ms':>10} {'img/s':>9} {'peak MiB':>9} {'GFLOP':>8} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.1f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['workload']:<24} {r['phase']:<10} {r['batch']:>5} {r['resolution']:>4} {1e3 * r['median_s']:>10.2f} "
              f"{r['images_per_s']:>9.1f} {mem:>9} {r['flops'] / 1e9:>8.2f} {mfu:>6}")
    print()
    for key, g in summary["goals"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(f"{key:<30} {value:>8}  goal {g['target']:<8} {'met' if g['met'] else 'NOT met' if g['met'] is False else ''}")


def run_benchmark(args, command: str) -> dict:
    """Every measurement of one benchmark run (``args``: the options of ``train/benchmark.py``), printed as a table,
    written to ``args.json`` when set, and returned as the summary dict; ``command`` is recorded in it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_ = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = RouterConfig.from_file(args.config)
    if args.overrides:
        tree = config.to_dict()
        for item in args.overrides:
            apply_override(tree, item)
        config = RouterConfig.from_dict(tree, where=f"{args.config} (with overrides)")
    model = Router(config).to(args.device_).eval()
    task = args.task or next((t.name for t in model.config.tasks if t.type == "seg"), model.config.tasks[0].name)
    settings = Settings(args.device_, bf16=args.bf16, channels_last=args.channels_last, sdpa=args.sdpa == "on",
                        compile=args.compile)

    rows, ratios = [], []
    for batch in args.batch_sizes:
        for res in args.resolutions:
            ratios.append(measure_size(model, task, batch, res, settings, args, rows))
    summary = {
        "command": command,
        "config": str(args.config), "overrides": args.overrides, "task": task, "hardware": hardware(args.device_), "settings": settings.as_dict(),
        "warmup": args.warmup, "reps": args.reps, "mem_method": rows[0]["mem_method"],
        # Top-level ratios: the worst case over the measured batch sizes and resolutions.
        "routed_over_sum_of_singles": max(r["routed_over_sum_of_singles"] for r in ratios),
        "top1_over_single": max((r["top1_over_single"] for r in ratios if "top1_over_single" in r), default=None),
        "router_only_over_single_worst": max((max(r["router_only_over_single"].values()) for r in ratios
                                              if "router_only_over_single" in r), default=None),
        "top1_over_single_worst_forced": max((r["top1_over_single_worst"] for r in ratios if "top1_over_single_worst" in r), default=None),
        "ratios": ratios,
    }
    if not args.no_cache and not args.no_train:
        summary["cache"] = cache_epochs(model, task, args, settings)
        summary["cache_speedup"] = summary["cache"]["cache_speedup"]
    summary["sync_audit"] = sync_audit(model, task, args, settings)
    ablations = []
    for option in args.ablate:  # routed inference and training step at the first size, option off vs on
        batch, res = args.batch_sizes[0], args.resolutions[0]
        target = None
        fns = {}
        for s in (settings, settings.flipped(option)):
            images = s.prepare(model, torch.rand(batch, 3, res, res, device=args.device_))
            target = make_target(model, task, images) if target is None else target
            key = "on" if getattr(s, option) else "off"
            fns[("inference", key)] = prepared(model, s, images, inference_fn(model, images, s, task))
            if not args.no_train:
                fns[("train_step", key)] = prepared(model, s, images, train_step_fn(model, task, images, target, s),
                                                    train=True)
        model.train()
        with restored_weights(model):
            results = measure_all(fns, args)
        model.eval()
        settings.prepare(model, images)  # back to the run's settings
        for (phase, key), r in results.items():
            ablations.append({"option": option, "on": key == "on", "phase": phase, "batch": batch,
                              "resolution": res, "images_per_s": batch / r["median_s"], **r})
    summary["ablations"] = ablations
    summary["goals"] = goals(summary)
    summary["results"] = rows
    print_table(rows, summary)
    for a in ablations:
        print(f"ablation {a['option']:<14} {'on ' if a['on'] else 'off'} {a['phase']:<10} {1e3 * a['median_s']:>10.2f} ms "
              f"{a['images_per_s']:>9.1f} img/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary



# ---- the training step from cached features: the routed pyramid next to the smp U-Net peers (issue 28) ----------
# The step of Comparison.train_seed (train/experiments/comparison.py) for one micro-batch of one segmentation task: forward on
# the cached frozen features (a peer runs its encoder on the images instead), the task loss (+ auxiliary seg head,
# + the gate's aux loss), backward, grad-norm clipping, the AdamW step of train/training/optim.py, zero_grad.
STEP_PARTS = ("align", "gate", "fuse", "detail", "decoder", "heads", "encoder", "loss", "backward", "clip", "optimizer")
STEP_GOALS = {"routed_over_peer_unet_frozen": (0.5, "<=")}  # issue 28's CPU goal for the step
STEP_OPTIONS = ("bf16", "channels_last", "compile")
PLACEHOLDER_CLASSES = {"seg": 2, "cls": 5}


def fill_task_classes(cfg) -> str:
    """Tasks of `cfg` (an ExperimentConfig) without classes take them from their dataset's meta.json where the data
    is there, else placeholder counts (the step's cost depends on them only through the output layers); returns
    where they came from."""
    from backbone_router.router.config import load_yaml_or_json
    from backbone_router.train.training.config import data_root

    root, sources = data_root(cfg.data.root), set()
    for t in cfg.model.tasks:
        if t.classes:
            continue
        meta = root / cfg.data.task(t.name).dataset / "meta.json"
        names = load_yaml_or_json(meta).get("classes" if t.type == "seg" else "image_classes") if meta.is_file() else None
        t.classes = list(names) if names else [f"class_{i}" for i in range(PLACEHOLDER_CLASSES[t.type])]
        sources.add(f"meta.json under {root}" if names else f"placeholders {PLACEHOLDER_CLASSES}")
    return ", ".join(sorted(sources)) or "the config"


def random_features(info, batch: int, size: tuple[int, int], generator: torch.Generator) -> dict:
    """Random features shaped as the extractor of `info` gives them for `batch` images of `size`: dense maps
    B x width x ceil(H / stride) x ceil(W / stride) (maps are cropped to the image, extractors/base.py) and the
    pooled B x width vector."""
    h, w = size
    dense = [torch.randn(batch, d, -(-h // s), -(-w // s), generator=generator) for d, s in zip(info.widths, info.strides)]
    return {"dense": dense, "pooled": torch.randn(batch, info.width, generator=generator)}


def weights_missing(model_cfg) -> list[str]:
    """The weight files the config's pretrained extractors name and this machine lacks."""
    return [e.checkpoint for e in model_cfg.extractors if e.pretrained and e.checkpoint and not Path(e.checkpoint).is_file()]


def part_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(part, module) pairs whose forward calls make up the model's parts, none called inside another: a Router's
    aligners (and their classification aligners, which the Router calls itself), gate, detail stem, decoder, heads
    and concat projections; a U-Net peer's encoders, decoders and segmentation heads. (The Router's fusion is a
    method: :func:`part_labels` labels it.)"""
    if isinstance(model, Router):
        named = [("align", m) for a in model.aligners.values() for m in (a, getattr(a, "cls", None)) if m is not None]
        named += [(part, getattr(model, attr)) for part, attr in (("gate", "gate"), ("detail", "detail"),
                  ("decoder", "decoder"), ("heads", "seg_head"), ("heads", "aux_seg_head"), ("heads", "cls_head"),
                  ("fuse", "concat_proj"), ("fuse", "concat_pooled_proj")) if getattr(model, attr, None) is not None]
        return named
    return [(part, getattr(unet, attr)) for unet in model.unets.values()
            for part, attr in (("encoder", "encoder"), ("decoder", "decoder"), ("heads", "segmentation_head"))]


@contextmanager
def part_labels(model: torch.nn.Module):
    """torch.profiler.record_function ranges named after the parts around their modules' forward calls (module
    hooks) and, in a Router, around its fusion methods ``_fuse`` / ``_fuse_pooled`` (wrapped on the instance)."""
    opened, handles = [], []

    def enter(label):
        def hook(module, args):
            opened.append(torch.profiler.record_function(label).__enter__())
        return hook

    def leave(module, args, output):
        opened.pop().__exit__(None, None, None)

    def labelled(fn, label):
        def run(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return run

    fused_methods = ("_fuse", "_fuse_pooled") if isinstance(model, Router) else ()
    try:
        for part, module in part_modules(model):
            if part != "fuse":  # the fusion's projections run inside the labelled _fuse
                handles += [module.register_forward_pre_hook(enter(part)), module.register_forward_hook(leave)]
        for name in fused_methods:
            model.__dict__[name] = labelled(getattr(model, name), "fuse")
        yield
    finally:
        for h in handles:
            h.remove()
        for name in fused_methods:
            model.__dict__.pop(name, None)


def comparison_step(model, task: str, images, target, features: dict, t, loss_fn, ignore_index, aux_weight: float,
                    optimizer, settings: Settings):
    """One micro-batch and optimizer step of Comparison.train_seed, its parts in record_function ranges."""
    params = [p for p in model.parameters() if p.requires_grad]
    rf = torch.profiler.record_function
    forward = settings.wrap(model)

    def step():
        with rf("step"):
            with settings.autocast():
                out = forward(images, task=task, features=features)
            with rf("loss"):
                loss = output_loss_of(out, loss_fn, target, ignore_index, aux_weight, t, task)
            with rf("backward"):
                loss.backward()
            with rf("clip"):
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], t.grad_clip)
            with rf("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return step


def part_seconds(model, step, steps: int) -> dict[str, float]:
    """Seconds per step of each part (and of the whole step, ``step``) from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with part_labels(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = Counter()
    for e in prof.key_averages():
        if e.key in (*STEP_PARTS, "step"):
            totals[e.key] += e.cpu_time_total / 1e6 / steps
    return dict(totals)


def part_flops(model, step, forward) -> dict[str, int]:
    """FLOPs (FlopCounterMode: matmuls and convolutions, 2 per multiply-add) of each module part in the forward
    pass (by the module that ran them), ``forward`` (all of it) and ``step`` (forward + backward of one step).
    The backward is one part: FlopCounterMode's attribution of backward ops to modules is not exact."""
    prefix = type(model).__name__
    names = {id(m): f"{prefix}.{n}" for n, m in model.named_modules()}
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        forward()
    with FlopCounterMode(display=False) as full:
        step()
    counts, out = fwd.get_flop_counts(), Counter()
    for part, module in part_modules(model):
        out[part] += int(sum(counts.get(names[id(module)], {}).values()))
    return {**out, "forward": int(fwd.get_total_flops()), "step": int(full.get_total_flops())}


def step_agreement(model, forward_loss, option: str) -> dict[str, float]:
    """How far `option` (bf16 autocast, channels_last or torch.compile) moves the forward's seg logits, the loss and
    every gradient from fp32 / contiguous / eager, from the same weights and inputs (dropout off, so both see the same
    network):
    max |diff|, max |diff| / max |reference| (outputs); for the gradients max |diff|, ||diff|| / ||reference|| over
    all of them together and the worst of it over the tensors."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for s in (Settings(torch.device("cpu")), Settings(torch.device("cpu"), **{option: True})):
        s.prepare(model, torch.zeros(1, 3, 1, 1))
        for m in dropouts:
            m.eval()
        out, loss = forward_loss(s)
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in params if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((out["seg"].detach().float(), loss.detach().float(), grads))
    Settings(torch.device("cpu")).prepare(model, torch.zeros(1, 3, 1, 1))
    model.train()
    (ref, ref_loss, ref_g), (new, new_loss, new_g) = results
    rel = {n: ((new_g[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref_g.items()}
    worst = max(rel, key=rel.get)
    overall = (sum((new_g[n] - g).square().sum() for n, g in ref_g.items()).sqrt()
               / sum(g.square().sum() for g in ref_g.values()).sqrt()).item()
    grad_abs = max((new_g[n] - g).abs().max().item() for n, g in ref_g.items())
    return {"output_max_abs": (new - ref).abs().max().item(),
            "output_max_rel": ((new - ref).abs().max() / ref.abs().max()).item(),
            "loss_abs": (new_loss - ref_loss).abs().item(), "grad_max_abs": grad_abs, "grad_worst_rel_norm": rel[worst], "grad_worst_tensor": worst,
            "grad_rel_norm": overall,
            "grad_tensors": len(ref_g)}


def optimizer_seconds(model, t, args) -> dict[str, float]:
    """Median seconds of one AdamW step over the model's trainable parameters (random gradients) for torch's
    per-tensor loop (its default off CUDA), foreach, fused, and what train/training/optim.py builds."""
    from backbone_router.train.training.optim import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    made = make_optimizer(params, t)

    def adamw(**implementation):  # the same groups (fresh dicts: AdamW writes its defaults into them)
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in made.param_groups]
        return torch.optim.AdamW(groups, **implementation)

    opts = {"single_tensor": adamw(foreach=False), "foreach": adamw(foreach=True), "fused": adamw(fused=True),
            "train/training/optim.py": made}
    times = interleaved_seconds({k: o.step for k, o in opts.items()}, args.device_, args.warmup, max(args.reps, 5))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return {k: r["median_s"] for k, r in times.items()}


def measure_step(models: dict, task: str, batch: int, res: int, args, cfg, features_from: str) -> dict:
    """Every model's step at one batch size and crop: time (interleaved), profile parts, FLOPs; the routed model's
    step with each option of ``--ablate`` (agreement with fp32 and time); the optimizer implementations."""
    from backbone_router.train.training.optim import make_optimizer

    t, tcfg, device = cfg.train, cfg.model.task(task), args.device_
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(batch, 3, res, res, generator=gen).to(device)
    target = torch.randint(0, tcfg.num_classes, (batch, res, res), generator=gen).to(device)
    routed = models["routed"]
    if features_from == "real":
        with torch.no_grad():
            features = {n: routed.extractors[n](images) for n in routed.extractor_names}
    else:
        features = {n: random_features(e.info, batch, (res, res), gen) for n, e in routed.extractors.items()}
    features = {n: {"dense": [d.to(device) for d in f["dense"]], "pooled": f["pooled"].to(device)}
                for n, f in features.items()}
    loss_fn = build_loss(t.loss[task])
    steps, forwards = {}, {}
    for name, model in models.items():
        model.to(device).train()
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
        aux = model.config.head.aux_weight if isinstance(model, Router) else 0.0
        steps[name] = comparison_step(model, task, images, target, features, t, loss_fn, tcfg.ignore_index, aux, opt,
                                      Settings(device))
        forwards[name] = functools.partial(model, images, task=task, features=features)
    timed = interleaved_seconds(steps, device, args.warmup, args.reps)
    rows = {}
    for name, model in models.items():
        seconds = part_seconds(model, steps[name], args.profile_steps)
        flops = part_flops(model, steps[name], forwards[name])
        profiled = seconds.pop("step")
        parts = {p: {"seconds": seconds.get(p, 0.0), "share": seconds.get(p, 0.0) / profiled, "flops": flops.get(p, 0)}
                 for p in STEP_PARTS if p in seconds or p in flops}
        parts["backward"]["flops"] = flops["step"] - flops["forward"]
        parts["other"] = {"seconds": profiled - sum(seconds.values()), "share": 1 - sum(seconds.values()) / profiled,
                          "flops": flops["forward"] - sum(flops.get(p, 0) for p in STEP_PARTS)}
        rows[name] = {**timed[name], "images_per_s": batch / timed[name]["median_s"], "profiled_step_s": profiled,
                      "flops_forward": flops["forward"], "flops_step": flops["step"], "parts": parts,
                      "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    out = {"batch": batch, "resolution": res, "task": task, "models": rows,
           "ratios": {f"routed_over_{n}": rows["routed"]["median_s"] / rows[n]["median_s"] for n in rows if n != "routed"}}

    # Speed options on the routed step: how far they move outputs and gradients, and whether they are faster.
    def forward_loss(s: Settings):
        with s.autocast():
            o = s.wrap(routed)(s.prepare(routed, images), task=task, features=features)
        return o, output_loss_of(o, loss_fn, target, tcfg.ignore_index, routed.config.head.aux_weight, t, task)

    options = {option: {"agreement": step_agreement(routed, forward_loss, option)} for option in args.ablate}
    if args.ablate:
        fns, first_call = {}, {}
        for key in ("fp32", *args.ablate):
            s = Settings(device, **({} if key == "fp32" else {key: True}))
            opt = make_optimizer([p for p in routed.parameters() if p.requires_grad], t)
            step = comparison_step(routed, task, images, target, features, t, loss_fn, tcfg.ignore_index,
                                   routed.config.head.aux_weight, opt, s)
            fns[key] = prepared(routed, s, images, step, train=True)
            if key == "compile":  # its first call compiles the forward and backward graphs: timed on its own, from
                torch._dynamo.reset()  # a cold dynamo cache (the agreement check compiled the same forward before)
                setup(fns[key])
                tick = time.perf_counter()
                fns[key]()
                synchronize(device)
                first_call[key] = time.perf_counter() - tick
        times = interleaved_seconds(fns, device, args.warmup, args.reps)
        Settings(device).prepare(routed, images)
        for option in args.ablate:
            options[option].update(median_s=times[option]["median_s"], fp32_median_s=times["fp32"]["median_s"],
                                   speedup=times["fp32"]["median_s"] / times[option]["median_s"])
            if option in first_call:
                options[option]["first_call_s"] = first_call[option]
    out["options"] = options
    out["optimizer_step_s"] = optimizer_seconds(routed, t, args)
    return out


def output_loss_of(out, loss_fn, target, ignore_index, aux_weight: float, t, task: str) -> torch.Tensor:
    """The comparison's loss of one seg micro-batch (as in :func:`comparison_step`)."""
    from backbone_router.router.outputs import output_loss

    loss = output_loss(out, "seg", loss_fn, target, ignore_index=ignore_index, aux_weight=aux_weight)
    return t.loss_weights.get(task, 1.0) * loss + t.aux_loss_weight * out["aux_loss"]


def step_models(args, cfg, cmp) -> tuple[dict, str]:
    """The variant's Router (shared frozen extractors, as train/compare.py builds it) and the U-Net peers, and where
    the features come from ("real": the configured weights; "random": no weights, random tensors)."""
    from backbone_router.train.experiments.comparison import build_router, expand_variants
    from backbone_router.train.experiments.peers import PEER_VARIANTS, UnetPeer, build_peer

    missing = weights_missing(cfg.model)
    source = args.features if args.features != "auto" else ("random" if missing else "real")
    if source == "real" and missing:
        raise FileNotFoundError(f"--features real: weight files missing: {missing}")
    variants = {v.name: v for v in expand_variants(cmp, cfg.model)}
    if args.variant not in variants:  # a base variant the file does not list (e.g. gated_image)
        variants = {v.name: v for v in expand_variants(dataclasses.replace(cmp, variants=[args.variant]), cfg.model)}
    if variants[args.variant].kind == "peer":
        raise ValueError(f"--variant {args.variant!r}: expected a Router variant (the peers are measured beside it)")
    torch.manual_seed(0)
    shared = {}
    for e in cfg.model.extractors:
        ext = create_extractor(e.spec, layers=e.layers, pretrained=e.pretrained and source == "real",
                               checkpoint=e.checkpoint if source == "real" else None, family=e.family, **e.kwargs)
        shared[e.name] = ext.freeze().eval()
    models = {"routed": build_router(variants[args.variant], shared, args.seed, {})}
    seg = {t.name: t.num_classes for t in cfg.model.tasks if t.type == "seg"}
    checkpoint = cmp.peer_checkpoint if source == "real" and cmp.peer_checkpoint else None
    for name in args.peers:
        torch.manual_seed(args.seed)
        models[name] = (build_peer(name, seg, checkpoint) if checkpoint
                        else UnetPeer(seg, None, train_encoder=PEER_VARIANTS[name]))
    return models, source


def print_step_table(summary: dict) -> None:
    hw = summary["hardware"]
    for size in summary["sizes"]:
        print(f"training step, task {size['task']}, batch {size['batch']}, crop {size['resolution']} px, "
              f"features {summary['features']}; {hw['cpu']} ({hw['cpu_capability']}), {hw['torch_threads']} thread(s)")
        head = f"{'model':<22} {'median s':>9} {'q1-q3 s':>13} {'img/s':>7} {'GFLOP fwd':>10} {'GFLOP step':>11} {'params':>10}"
        print(head)
        print("-" * len(head))
        for name, r in size["models"].items():
            print(f"{name:<22} {r['median_s']:>9.3f} {r['q1_s']:>6.3f}-{r['q3_s']:<6.3f} {r['images_per_s']:>7.1f} "
                  f"{r['flops_forward'] / 1e9:>10.2f} {r['flops_step'] / 1e9:>11.2f} {r['params_trained']:>10,}")
        for key, value in size["ratios"].items():
            print(f"{key:<36} {value:.3f}")
        for name, r in size["models"].items():
            print(f"\nparts of {name} (torch.profiler, {summary['profile_steps']} steps, profiled step {r['profiled_step_s']:.3f} s)")
            print(f"  {'part':<10} {'s/step':>8} {'share':>7} {'GFLOP':>8}")
            for part, p in r["parts"].items():
                print(f"  {part:<10} {p['seconds']:>8.3f} {100 * p['share']:>6.1f}% {p['flops'] / 1e9:>8.3f}")
        for option, o in size["options"].items():
            a = o["agreement"]
            first = f", first call {o['first_call_s']:.1f} s" if "first_call_s" in o else ""
            print(f"\noption {option}: step {o['median_s']:.3f} s vs fp32 {o['fp32_median_s']:.3f} s (x{o['speedup']:.2f}{first}); "
                  f"seg logits max abs {a['output_max_abs']:.2e} (rel {a['output_max_rel']:.2e}), loss {a['loss_abs']:.2e}, "
                  f"grads max abs {a['grad_max_abs']:.2e}, rel norm {a['grad_rel_norm']:.2e} (worst tensor "
                  f"{a['grad_worst_rel_norm']:.2e}: {a['grad_worst_tensor']})")
        print("\nAdamW step over the routed model's parameters: " + ", ".join(
            f"{k} {1e3 * v:.1f} ms" for k, v in size["optimizer_step_s"].items()))
    for key, g in summary["goals"].items():
        print(f"{key:<36} {g['value']:.3f}  goal {g['target']}  {'met' if g['met'] else 'NOT met'}")


def run_step_benchmark(args, command: str) -> dict:
    """The training step of a routed variant from cached features next to the U-Net peers (``--train-step``)."""
    from backbone_router.train.experiments.compare_config import load_compare_config

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_ = torch.device(args.device)
    if bad := sorted(set(args.ablate) - set(STEP_OPTIONS)):
        raise ValueError(f"--ablate {bad}: the training-step benchmark measures {list(STEP_OPTIONS)}")
    cfg, cmp = load_compare_config(args.config, args.overrides)
    classes_from = fill_task_classes(cfg)
    task = args.task or next(t.name for t in cfg.model.tasks if t.type == "seg")
    if cfg.model.task(task).type != "seg":
        raise ValueError(f"--task {task!r}: the step benchmark needs a segmentation task (the peers serve only those)")
    models, source = step_models(args, cfg, cmp)
    sizes = [measure_step(models, task, b, r, args, cfg, source) for b in args.batch_sizes for r in args.resolutions]
    summary = {"command": command, "config": str(args.config), "overrides": args.overrides, "variant": args.variant,
               "features": source, "features_note": {
                   "real": "the extractors with the configured weights, run once on the benchmark's images (as the cache holds them)",
                   "random": "random tensors of the extractors' output shapes (no weights needed; timing does not depend on values)",
               }[source], "peer_encoder": "ImageNet weights" if source == "real" and cmp.peer_checkpoint else "random weights",
               "classes_from": classes_from, "hardware": hardware(args.device_), "warmup": args.warmup, "reps": args.reps,
               "profile_steps": args.profile_steps, "sizes": sizes}
    summary["goals"] = {}
    for key, (target, op) in STEP_GOALS.items():
        values = [s["ratios"][key] for s in sizes if key in s["ratios"]]
        if values:
            value = max(values)
            summary["goals"][key] = {"value": value, "target": f"{op} {target}",
                                     "met": value <= target if op == "<=" else value >= target}
    print_step_table(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
