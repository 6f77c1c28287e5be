"""Faults and bad input (docs/reliability.md): nothing unpickled, nothing lost, every error names its file or key.

Each test checks behaviour: a planted pickle's marker file is never created, a broken checkpoint dir hashes the
same before and after, the previous checkpoint survives a kill, image values are the expected ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import script_main
from PIL import Image
from safetensors.torch import load_file, save_file
from test_hub import cache_snapshot

from backbone_router.extractors import create_extractor
from backbone_router.extractors.io.images import read_image, to_image_tensor
from backbone_router.extractors.local_dir import save_extractor_dir
from backbone_router.router import Router, RouterConfig
from backbone_router.router.config import FORMAT_VERSION
from backbone_router.train.training.checkpoints import latest_checkpoint
from backbone_router.train.training.config import ExperimentConfig
from backbone_router.train.training.data import train_transform
from backbone_router.train.training.faults import FAULT_ENV
from backbone_router.train.training.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


class _WritesMarker:
    """Unpickling this creates a file: the code-execution attack on pickled checkpoints."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def plant_pickle(path: Path, marker: Path) -> Path:
    """A torch.save-format file at `path` whose unpickling would create `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": _WritesMarker(marker)}, path)
    return path


def dir_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(d)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tensor_byte_range(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of one tensor's data in a safetensors file (8-byte header length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---- fixtures ---------------------------------------------------------------------------------------------
def router_config(width: int = 16) -> dict:
    return {
        "extractors": [{"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": TINY_VIT}],
        "tasks": [{"name": "seg", "type": "seg", "classes": ["bg", "fg"]}, {"name": "cls", "type": "cls", "classes": ["a", "b", "c"]}],
        "fusion": "gated", "width": width, "levels": [16], "gate": {"hidden": 8}, "head": {"seg_hidden": 8, "cls_hidden": 8},
    }


@pytest.fixture(scope="module")
def saved_router(tmp_path_factory) -> tuple[Router, Path]:
    torch.manual_seed(0)
    model = Router(RouterConfig.from_dict(router_config())).eval()
    return model, model.save_pretrained(tmp_path_factory.mktemp("router") / "m")


@pytest.fixture(scope="module")
def saved_extractor_dir(tmp_path_factory) -> Path:
    ext = create_extractor("timm:vit_small_patch16_224", pretrained=False, **TINY_VIT)
    return save_extractor_dir(ext, tmp_path_factory.mktemp("ext") / "e", "vit_small_patch16_224", TINY_VIT)


TINY_RUN = {
    "model": {
        "extractors": [{"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": TINY_VIT}],
        "tasks": [{"name": "shape_seg", "type": "seg"}, {"name": "shape_cls", "type": "cls"}],
        "fusion": "gated", "width": 16, "levels": [8], "gate": {"hidden": 8}, "head": {"seg_hidden": 8, "cls_hidden": 8},
    },
    "data": {"tasks": [{"name": "shape_seg", "dataset": "shapes"}, {"name": "shape_cls", "dataset": "shapes"}],
             "image_size": 32, "eval_size": 32},
    "train": {"max_steps": 4, "seed": 1, "batch_size": 2, "eval_batch_size": 4, "warmup_steps": 1, "eval_every": 4,
              "save_every": 2, "log_every": 1, "keep_last": 3},
}


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory) -> Path:
    """A tiny synthetic dataset and a 4-step config (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("runs")
    write_synthetic_dataset(tmp / "data", "shapes", n_train=8, n_val=4, size=32, ignore_border=1, seed=0)
    cfg = dict(TINY_RUN, data={**TINY_RUN["data"], "root": str(tmp / "data")})
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def main(argv: list[str]) -> int:
    """train/finetune.py with these arguments, in this process."""
    return script_main("finetune")(argv)


def finetune(setup: Path, out: Path, *extra: str) -> int:
    return main(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def reference_run(run_setup) -> Path:
    """The uninterrupted run, in this process."""
    out = run_setup / "reference"
    assert finetune(run_setup, out) == 0
    return out


# ---- untrusted files: no pickle is ever run ----------------------------------------------------------------
def test_code_pickle_never_runs_through_any_entry_point_that_takes_a_path(tmp_path, saved_router, saved_extractor_dir):
    marker = tmp_path / "marker.txt"
    evil = plant_pickle(tmp_path / "evil.pth", marker)
    # open_clip: the file named inside the spec (absolute path after "//")
    with pytest.raises(ValueError, match=r"evil\.pth: refused or unreadable with torch\.load\(weights_only=True\)"):
        create_extractor(f"open_clip:tiny-vit-p16/{evil}")
    # local-dir: a model.safetensors that is a pickle, and checkpoint= a pickle
    local = tmp_path / "local"
    shutil.copytree(saved_extractor_dir, local)
    plant_pickle(local / "model.safetensors", marker)
    with pytest.raises(ValueError, match=r"local/model\.safetensors: not a readable safetensors file"):
        create_extractor(f"local-dir:{local}")
    with pytest.raises(ValueError, match=r"evil\.pth: refused"):
        create_extractor(f"local-dir:{saved_extractor_dir}", checkpoint=str(evil))
    # Router.from_pretrained: model.safetensors is a pickle
    router = tmp_path / "router"
    shutil.copytree(saved_router[1], router)
    plant_pickle(router / "model.safetensors", marker)
    with pytest.raises(ValueError, match=r"router/model\.safetensors: not a readable safetensors file"):
        Router.from_pretrained(router)
    # transformers dir: a pytorch_model.bin that is a pickle (transformers reads it with weights_only=True)
    import transformers as tf

    hf = tmp_path / "hf"
    tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=30,
                    patch_size=2).save_pretrained(hf)
    plant_pickle(hf / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; what matters is the marker below
        create_extractor(f"hf:{hf}")
    assert not marker.exists(), "pickled code ran"


@pytest.mark.parametrize("planted", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_code_pickle_in_the_checkpoint_naming_it(run_setup, tmp_path, planted):
    out = tmp_path / "run"
    assert finetune(run_setup, out, "--stop-at", "2") == 0
    ckpt = out / "checkpoints" / "step_2"
    marker = tmp_path / "marker.txt"
    plant_pickle(ckpt / planted, marker)  # random_states: accelerate alone would skip it silently
    before = dir_hash(ckpt)
    with pytest.raises(SystemExit, match=rf"step_2/{planted} refused or unreadable with torch\.load\(weights_only=True\)"):
        main(["--output-dir", str(out), "--resume"])
    assert not marker.exists(), "pickled code ran"
    assert dir_hash(ckpt) == before


def test_resume_refuses_a_checkpoint_without_model_safetensors(run_setup, tmp_path):
    out = tmp_path / "run"
    assert finetune(run_setup, out, "--stop-at", "2") == 0
    ckpt = out / "checkpoints" / "step_2"
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")  # accelerate would fall back to torch.load
    with pytest.raises(SystemExit, match=r"step_2/model\.safetensors is missing"):
        main(["--output-dir", str(out), "--resume"])


# ---- broken checkpoints: a clear error naming file and key; nothing modified ------------------------------
ROUTER_FAULTS = {
    # name: (break the copied dir, regex of the error)
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                  r"model\.safetensors: not a readable safetensors file"),
    "byte_flipped": (lambda d: flip_byte(d / "model.safetensors", tensor_byte_range(d / "model.safetensors", "seg_head.outputs.seg.weight")[0] + 3),
                     r"model\.safetensors: tensor\(s\) \['seg_head\.outputs\.seg\.weight'\] do not match their CRC-32"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{'extractors': oops"),
                        r"config\.json: not valid JSON"),
    "newer_format_version": (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                                                  "format_version": FORMAT_VERSION + 1})),
                             rf"config\.json: format_version {FORMAT_VERSION + 1} is newer than this package reads \({FORMAT_VERSION}\)"),
    "another_models_keys": (lambda d: save_file({"backbone.conv1.weight": torch.zeros(3)}, str(d / "model.safetensors"),
                                                metadata={"saved_extractors": "[\"p16\"]"}),
                            r"model\.safetensors: does not fit .*unexpected keys \['backbone\.conv1\.weight'\]"),
    "shape_mismatch": (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "level_widths": [24]})),
                       r"model\.safetensors: does not fit .*shape mismatches .*'aligners\.p16\.levels\.16\.proj\.weight: file \(16, 32, 1, 1\) vs model \(24, 32, 1, 1\)'"),
}


@pytest.mark.parametrize("fault", list(ROUTER_FAULTS))
def test_broken_router_checkpoint_is_a_clear_error_and_is_not_modified(saved_router, tmp_path, fault):
    d = tmp_path / "m"
    shutil.copytree(saved_router[1], d)
    breaker, pattern = ROUTER_FAULTS[fault]
    breaker(d)
    before = dir_hash(d)
    with pytest.raises((ValueError, TypeError), match=pattern):
        Router.from_pretrained(d)
    assert dir_hash(d) == before


def _set_config(d: Path, **kv) -> None:
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **kv}))


LOCAL_DIR_FAULTS = {
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
                  r"model\.safetensors: not a readable safetensors file"),
    "byte_flipped": (lambda d: flip_byte(d / "model.safetensors", tensor_byte_range(d / "model.safetensors", "blocks.1.attn.qkv.weight")[1] - 1),
                     r"model\.safetensors: tensor\(s\) \['blocks\.1\.attn\.qkv\.weight'\] do not match their CRC-32"),
    "config_not_json": (lambda d: (d / "config.json").write_text("not json"), r"config\.json: not valid JSON"),
    "newer_format_version": (lambda d: _set_config(d, format_version=9), r"config\.json: format_version 9 is newer"),
    "another_models_keys": (lambda d: save_file({"features.0.0.weight": torch.zeros(3)}, str(d / "model.safetensors")),
                            r"model\.safetensors: weights do not fit .*unexpected keys \['features\.0\.0\.weight'\]"),
    "shape_mismatch": (lambda d: _set_config(d, model_kwargs={**TINY_VIT, "embed_dim": 48}),
                       r"model\.safetensors: weights do not fit .*shape mismatches \[.*'(cls_token: file \(1, 1, 32\) vs model \(1, 1, 48\)|"
                       r"blocks\.0\.attn\.qkv\.weight: file \(96, 32\) vs model \(144, 48\))'"),
}


@pytest.mark.parametrize("fault", list(LOCAL_DIR_FAULTS))
def test_broken_local_dir_is_a_clear_error_and_is_not_modified(saved_extractor_dir, tmp_path, fault):
    d = tmp_path / "e"
    shutil.copytree(saved_extractor_dir, d)
    breaker, pattern = LOCAL_DIR_FAULTS[fault]
    breaker(d)
    before = dir_hash(d)
    with pytest.raises(ValueError, match=pattern):
        create_extractor(f"local-dir:{d}")
    assert dir_hash(d) == before


# ---- crash safety ----------------------------------------------------------------------------------------------
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from pathlib import Path
import accelerate
original, calls = accelerate.Accelerator.save_state, []
def save_state(self, output_dir=None, **kw):
    calls.append(output_dir)
    if len(calls) == 2:  # the step-4 checkpoint: write its temp dir, leave a half-written file, then kill -9
        original(self, output_dir, **kw)
        weights = Path(output_dir) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir, **kw)
accelerate.Accelerator.save_state = save_state
import runpy
sys.argv[0] = os.path.join(os.getcwd(), "train", "finetune.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill9_during_a_checkpoint_write_keeps_the_previous_one_and_resume_finishes(run_setup, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, "--config", str(run_setup / "tiny.yaml"),
                           "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp_step_4").is_dir() and not (ckpts / "step_4").exists()  # killed mid-write
    assert latest_checkpoint(out) == ckpts / "step_2"
    step2 = load_file(str(ckpts / "step_2" / "model.safetensors"))  # complete and readable
    assert all(torch.isfinite(v).all() for v in step2.values() if v.is_floating_point())
    assert main(["--output-dir", str(out), "--resume"]) == 0
    assert not (ckpts / ".tmp_step_4").exists() and (ckpts / "step_4" / "trainer_state.json").is_file()
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(reference_run / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(run_setup, tmp_path, monkeypatch, capsys):
    import errno

    import accelerate

    from backbone_router.train.training.errors import run_cli

    original, calls, step2 = accelerate.Accelerator.save_state, [], {}
    out = tmp_path / "full"

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-4 checkpoint: the disk fills while it is written
            step2["hash"] = dir_hash(out / "checkpoints" / "step_2")
            original(self, output_dir, **kw)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return original(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    assert run_cli(lambda: finetune(run_setup, out), argv=[]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]  # not progress bars
    assert len(err) == 1 and re.match(  # before: a 66-line traceback
        rf"error: {re.escape(str(out))}: the disk filled while writing checkpoint step_4 \(No space left on device "
        rf"\(simulated\); [\d.]+ MiB free now\); {re.escape(str(out))}/checkpoints/step_2 is intact: free space, then "
        rf"--resume --output-dir ", err[0]), err
    assert latest_checkpoint(out) == out / "checkpoints" / "step_2"
    assert dir_hash(out / "checkpoints" / "step_2") == step2["hash"]
    assert not (out / "final").exists() and not (out / "checkpoints" / ".tmp_step_4").exists()  # its space back
    assert not (out / ".lock").exists()  # released: --resume can start
    monkeypatch.undo()  # space freed: --resume from step_2 finishes
    assert finetune(run_setup, out, "--resume") == 0 and (out / "checkpoints" / "step_4").is_dir()
    assert (out / "final" / "model.safetensors").is_file()


def test_disk_full_while_final_is_written_is_one_line_and_resume_writes_it(run_setup, tmp_path, monkeypatch, capsys):
    import errno

    from backbone_router.train.training.errors import run_cli

    out, original = tmp_path / "full_final", Router.save_pretrained

    def save_pretrained(self, folder, **kw):
        original(self, folder, **kw)  # written into .tmp_final, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(Router, "save_pretrained", save_pretrained)
    assert run_cli(lambda: finetune(run_setup, out), argv=[]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]
    assert len(err) == 1 and re.match(rf"error: {re.escape(str(out))}: the disk filled while writing final/ \(No space "
                                      rf"left .*; {re.escape(str(out))}/checkpoints/step_4 is intact: free space, then "
                                      r"--resume", err[0]), err
    assert not (out / "final").exists() and not (out / ".tmp_final").exists()
    monkeypatch.undo()
    assert finetune(run_setup, out, "--resume") == 0 and (out / "final" / "model.safetensors").is_file()


def test_unwritable_output_dir_fails_before_anything_is_written(run_setup, tmp_path):
    # Tests run as root, where a read-only mode does not stop writes: a path under a regular file is unwritable
    # for everyone (NotADirectoryError).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match=r"--output-dir .*a_file/run: cannot write there \(NotADirectoryError"):
        finetune(run_setup, blocker / "run")
    assert blocker.read_text() == "x"


def test_too_little_free_space_fails_at_start(run_setup, tmp_path, monkeypatch):
    out = tmp_path / "small_disk"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))  # simulated: 1 MiB free
    with pytest.raises(SystemExit, match=r"small_disk: 1\.0 MiB free, but 4 checkpoints and the final model need"):
        finetune(run_setup, out)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# ---- numerical faults ------------------------------------------------------------------------------------------
def test_nan_after_a_checkpoint_stops_naming_step_and_task_and_keeps_the_checkpoint(run_setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    monkeypatch.setenv(FAULT_ENV, "nan@2")
    assert finetune(run_setup, out) == 3
    text = capsys.readouterr().out
    assert "non-finite loss at step 2 (task 'shape_" in text and "Last checkpoint (kept):" in text
    assert latest_checkpoint(out) == out / "checkpoints" / "step_2" and not (out / "final").exists()
    assert not (out / "checkpoints" / "step_4").exists()
    weights = load_file(str(out / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # the run goes on from that checkpoint with train.on_nonfinite=skip (a resumable change)
    assert main(["--output-dir", str(out), "--resume", "train.on_nonfinite=skip"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "step 2: non-finite loss" in text and (out / "final").is_dir()


def test_nan_with_on_nonfinite_skip_drops_that_step_and_finishes(run_setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "skip"
    monkeypatch.setenv(FAULT_ENV, "nan@1")
    assert finetune(run_setup, out, "train.on_nonfinite=skip") == 0
    text = capsys.readouterr().out
    assert "step 1: non-finite loss (task 'shape_" in text and "optimizer step skipped" in text
    assert "1 optimizer step(s) skipped for a non-finite loss: [1]" in text
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ---- bad images: in predict (extractors/io/images.py) and in training (train/training/data.py) ---------------------------------
READERS = {"predict": lambda p: to_image_tensor(p), "train": lambda p: read_image(p, 3)}


@pytest.mark.parametrize("reader", list(READERS))
def test_image_modes_give_the_expected_values(tmp_path, reader):
    read = READERS[reader]
    # 16-bit greyscale: scaled by 65535 (Pillow's own 8-bit conversion would clip at 255)
    a16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    t = read(tmp_path / "g16.png")
    torch.testing.assert_close(t[0], torch.from_numpy(a16.astype(np.float32) / 65535))
    # palette: mapped to its RGB colours
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    torch.testing.assert_close(read(tmp_path / "pal.png")[:, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    # RGBA: alpha dropped, colour kept (not composited)
    Image.fromarray(np.array([[[10, 20, 30, 0]]], np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    torch.testing.assert_close(read(tmp_path / "rgba.png")[:, 0, 0], torch.tensor([10.0, 20.0, 30.0]) / 255)
    # EXIF orientation 6 (rotate 90 clockwise to display): the displayed array
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).convert("RGB").save(tmp_path / "rot.png", exif=exif)
    expected = torch.from_numpy(np.rot90(arr, k=-1).astype(np.float32) / 255)
    torch.testing.assert_close(read(tmp_path / "rot.png")[0], expected)
    # 1 x 1
    Image.fromarray(np.full((1, 1, 3), 51, np.uint8)).save(tmp_path / "one.png")
    torch.testing.assert_close(read(tmp_path / "one.png"), torch.full((3, 1, 1), 0.2))


@pytest.mark.parametrize("reader", list(READERS))
def test_bad_image_files_are_refused_naming_the_file(tmp_path, reader):
    read = READERS[reader]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    # A PNG header claiming 20000 x 20000 (400 M pixels): above Pillow's bomb limit (2 x 89.5 M), refused before decoding
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                                        + chunk(b"IEND", b""))
    for name, why in (("empty.png", "UnidentifiedImageError"), ("text.jpg", "UnidentifiedImageError"),
                      ("bomb.png", "DecompressionBombError"), ("missing.png", "FileNotFoundError")):
        with pytest.raises(ValueError, match=rf"{name}: unreadable image \({why}"):
            read(tmp_path / name)


def test_8000x8000_image_decodes_in_predict_and_training(tmp_path):
    arr = np.zeros((8000, 8000), np.uint8)
    arr[0, 0], arr[-1, -1] = 255, 51
    Image.fromarray(arr).save(tmp_path / "big.png", compress_level=1)
    for t in (to_image_tensor(tmp_path / "big.png"), read_image(tmp_path / "big.png", 1)):
        assert t.shape == (1, 8000, 8000) and float(t[0, 0, 0]) == 1.0 and float(t[0, -1, -1]) == pytest.approx(0.2)
        del t


def test_1x1_images_predict_and_train(saved_router):
    model = saved_router[0]
    preds = model.predict([np.full((1, 1, 3), 200, np.uint8), Image.new("L", (1, 1), 7)], task="seg")
    masks = [p["mask"] for p in preds]
    assert [tuple(m.shape) for m in masks] == [(1, 1), (1, 1)] and all(int(m.max()) <= 1 for m in masks)
    cfg = ExperimentConfig.from_dict(TINY_RUN)
    image, mask = train_transform(torch.full((3, 1, 1), 0.5), torch.ones(1, 1, dtype=torch.long), 32, cfg.data,
                                  torch.Generator().manual_seed(0))
    assert image.shape == (3, 32, 32) and bool((mask == 1).all())


def test_non_images_in_predict_name_the_input(saved_router):
    model = saved_router[0]
    with pytest.raises(TypeError, match=r"images\[1\]: unsupported NumPy dtype <U1"):
        model.predict([np.zeros((4, 4), np.uint8), np.array([["a"]])], task="seg")
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image, NumPy array or torch.Tensor, got dict"):
        model.predict([{"not": "an image"}], task="seg")


def test_float_images_outside_0_1_are_refused_naming_the_range(saved_router):
    model = saved_router[0]
    photo = np.random.default_rng(0).uniform(0, 255, (6, 5, 3)).astype(np.float32)  # 0-255 data as float
    with pytest.raises(ValueError, match=r"images\[1\]: float values in \[0\.\d+, 25\d\.\d+\]; expected \[0, 1\] "
                                         r"\(divide 0-255 data by 255 or pass uint8\)"):
        model.predict([np.zeros((4, 4), np.uint8), photo], task="seg")
    normalised = (torch.rand(3, 8, 8) - 0.45) / 0.22  # ImageNet-normalised by the caller
    with pytest.raises(ValueError, match=r"image: float values in \[-2\.\d+, 2\.\d+\]; expected \[0, 1\] \(pass "
                                         r"un-normalised images"):
        to_image_tensor(normalised)
    with pytest.raises(ValueError, match=r"image: float values include NaN"):
        to_image_tensor(torch.full((1, 2, 2), float("nan")))
    nearly = torch.tensor([[[1.0004, -0.0002]]])  # resampling overshoot: clamped, not refused
    assert to_image_tensor(nearly).tolist() == [[[1.0, 0.0]]]
    assert to_image_tensor(photo / 255).dtype == torch.float32


@pytest.mark.parametrize("reader", list(READERS))
def test_mode_i_images_are_scaled_by_the_range_their_values_occupy(tmp_path, reader):
    read = READERS[reader]
    for values, scale in (([0, 51, 255], 255), ([0, 4095, 1000], 65535), ([0, 70000, 2**31 - 1], 2**31 - 1)):
        arr = np.array([values], dtype=np.int32)
        Image.fromarray(arr, mode="I").save(tmp_path / "i.tif")  # TIFF keeps 32-bit integers (mode I)
        with Image.open(tmp_path / "i.tif") as im:
            assert im.mode == "I"
        torch.testing.assert_close(read(tmp_path / "i.tif")[0], torch.from_numpy(arr / scale).float())
    Image.fromarray(np.array([[-5, 3]], dtype=np.int32), mode="I").save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif: mode I image with negative values \(min -5\)"):
        read(tmp_path / "neg.tif")


def test_pixel_budget_shrinks_large_images_with_a_note():
    from backbone_router.extractors.io.images import DEFAULT_MAX_PIXELS, fit_pixel_budget

    photo = torch.rand(3, 3000, 4000)  # 12 M pixels: a phone photo
    small, note = fit_pixel_budget(photo, DEFAULT_MAX_PIXELS, "images[0]")
    assert small.shape == (3, 1732, 2309) and small.shape[1] * small.shape[2] <= DEFAULT_MAX_PIXELS
    assert abs(small.shape[2] / small.shape[1] - 4 / 3) < 1e-3 and 0 <= float(small.min()) <= float(small.max()) <= 1
    assert note == ("images[0]: 3000x4000 (12.0 M pixels) is above max_pixels=4,000,000; predicted at 1732x2309 and "
                    "resized back (pass max_pixels=None to predict at full size)")
    same, none = fit_pixel_budget(photo, None)
    assert same is photo and none is None
    same, none = fit_pixel_budget(torch.rand(1, 2000, 2000), DEFAULT_MAX_PIXELS)
    assert same.shape == (1, 2000, 2000) and none is None


# ---- config: errors at start naming the key or file ------------------------------------------------------------
@pytest.mark.parametrize("override, pattern", [
    ("model.gate.temperature=hot", r"model\.gate\.temperature: expected a number|model.gate.temperature"),
    ("model.width=[16]", r"model\.width: expected int, got list"),
    ("train.hflip=1", r"unknown key 'train\.hflip'"),
    ("data.hflip=yes please", r"data\.hflip: expected bool, got str"),
    ("train.on_nonfinite=ignore", r"train\.on_nonfinite: expected 'stop' or 'skip', got 'ignore'"),
    ("train.lr=-0.1", r"train\.lr: must be > 0, got -0\.1"),
    ("train.min_lr_ratio=2", r"train\.min_lr_ratio: expected a value in \[0, 1\], got 2"),
    ("data.tasks.0.weight=heavy", r"data\.tasks\.0\.weight=.*expected a number"),
    # sizes checked at load (issue 12): eval_size 0 used to train the whole run and then crash, stride 0 divided by 0
    ("data.eval_size=0", r"data\.eval_size: must be an int >= 1, got 0"),
    ("data.eval_size=[32]", r"data\.eval_size: expected a side or \[h, w\], got \[32\]"),
    ("data.eval_size=[32, 0]", r"data\.eval_size: must be ints >= 1, got \[32, 0\]"),
    ("data.image_size=0", r"data\.image_size: must be an int >= 1, got 0"),
    ("data.tasks.0.eval_size=-4", r"data\.tasks\[shape_seg\]\.eval_size: must be an int >= 1, got -4"),
    ("data.tasks.1.max_val_items=0", r"data\.tasks\[shape_cls\]\.max_val_items: must be an int >= 1, got 0"),
    ("data.num_workers=-1", r"data\.num_workers: must be an int >= 0, got -1"),
    ("model.levels=[0]", r"model: levels: expected distinct positive strides in ascending order.*got \[0\]"),
    ("model.width=0", r"model: width: expected a positive number of channels, got 0"),
    ("model.gate.hidden=0", r"model\.gate\.hidden: must be an int >= 1, got 0"),
    ("model.head.seg_hidden=0", r"model\.head\.seg_hidden: must be an int >= 1, got 0"),
])
def test_wrong_config_values_name_the_key(override, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        ExperimentConfig.from_dict(TINY_RUN, [override])


def test_pretrain_config_values_name_the_key_and_yaml_exponents_are_floats(tmp_path):
    from backbone_router.train.selfsup.pretrain_config import load_pretrain_config

    for override, pattern in (("train.batch_size=0", r"train\.batch_size: must be an int >= 1, got 0"),
                              ("data.image_size=0", r"data\.image_size: must be an int >= 1, got 0"),
                              ("train.lr=0", r"train\.lr: must be > 0, got 0"),
                              ("decoder.num_heads=0", r"decoder\.num_heads: must be an int >= 1, got 0")):
        with pytest.raises((TypeError, ValueError), match=pattern):
            load_pretrain_config(REPO / "configs" / "pretrain_mae.yaml", [override])
    # `lr: 1e-3` in a YAML file: PyYAML (YAML 1.1) reads it as the string "1e-3"; an override read it as a float
    text = (REPO / "configs" / "pretrain_mae.yaml").read_text()
    (tmp_path / "mae.yaml").write_text(text.replace("  lr: 1.5e-3", "  lr: 1e-3").replace("  min_lr: 1.0e-5", "  min_lr: 5E-6"))
    cfg = load_pretrain_config(tmp_path / "mae.yaml")
    assert (cfg.train.lr, cfg.train.min_lr) == (1e-3, 5e-6)
    exp = dict(TINY_RUN, train={k: v for k, v in TINY_RUN["train"].items()})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp).replace("  max_steps: 4", "  max_steps: 4\n  lr: 3e-4\n  weight_decay: 1e-2"))
    cfg = ExperimentConfig.from_file(tmp_path / "exp.yaml", ["train.betas=[0.9, 9.9e-1]"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.betas) == (3e-4, 1e-2, [0.9, 0.99])


def test_missing_dataset_dir_and_masks_that_do_not_fit_the_classes_fail_at_start(run_setup, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tasks\[shape_seg\]\.dataset: .*nowhere is not a folder"):
        finetune(run_setup, tmp_path / "a", "data.tasks.0.dataset=nowhere", "data.tasks.1.dataset=nowhere")
    data = tmp_path / "data"
    shutil.copytree(run_setup / "data", data)
    last_val = sorted((data / "shapes" / "masks").glob("*.png"))[-1]  # read only at the first evaluation otherwise
    mask = np.array(Image.open(last_val))
    mask[0, 0] = 2  # a third class in a 2-class task
    Image.fromarray(mask).save(last_val)
    with pytest.raises(ValueError, match=rf"{last_val.name}: mask values \[2\] outside the classes \(0\.\.1 or ignore_index 255\)"):
        finetune(run_setup, tmp_path / "b", f"data.root={data}", "train.prior_init=false")
    assert not (tmp_path / "b" / "checkpoints").exists()


# ---- distributed: one failing process takes the run down ---------------------------------------------------------
@pytest.mark.slow
def test_a_failing_process_takes_the_two_process_run_down_with_its_message(run_setup, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", str(REPO / "train" / "finetune.py"),
           "--config", str(run_setup / "tiny.yaml"), "--output-dir", str(out), "train.batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: "raise@1@1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)  # a hang fails here
    assert proc.returncode != 0
    assert "injected fault (BACKBONE_ROUTER_INJECT_FAULT=raise@1@1) in process 1 at step 1" in proc.stdout + proc.stderr
    assert not (out / "final").exists() and latest_checkpoint(out) is None


def test_fault_hook_is_inert_unless_set(monkeypatch):
    from backbone_router.train.training.faults import injected_fault

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert injected_fault(1, 1) is None
    monkeypatch.setenv(FAULT_ENV, "raise@3@1")
    assert injected_fault(3, 0) is None and injected_fault(2, 1) is None
    with pytest.raises(RuntimeError, match="in process 1 at step 3"):
        injected_fault(3, 1)


# ---- files people can share; tests independent of the developer's machine -----------------------------------------
def test_atomically_written_files_and_folders_get_the_umask_mode(tmp_path, saved_router):
    import stat

    from backbone_router.extractors.io.atomic import atomic_write_bytes

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        saved = saved_router[0].save_pretrained(tmp_path / "m")
        data = write_synthetic_dataset(tmp_path / "data", "shapes", n_train=2, n_val=1, size=16, ignore_border=0, seed=0)
        assert mode(tmp_path / "a.json") == 0o644  # mkstemp alone gives 0600
        assert mode(saved / "model.safetensors") == 0o644 and mode(saved / "config.json") == 0o644
        assert mode(data) == 0o755  # mkdtemp alone gives 0700
        os.umask(0o007)
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert mode(tmp_path / "a.json") == 0o660
    finally:
        os.umask(old)


def test_tests_use_a_private_empty_hugging_face_home():
    from huggingface_hub.constants import HF_HUB_CACHE

    home = Path(os.environ["HF_HOME"])
    assert home.name.startswith("backbone_router_test_hf_home_") and home.is_dir()
    assert Path(HF_HUB_CACHE).is_relative_to(home), "huggingface_hub read HF_HOME before conftest set it"
    assert not any(Path(HF_HUB_CACHE).glob("models--*")), "nothing may be cached in the tests' hub cache"


# ---- one run per output dir (train/training/rundir.py) --------------------------------------------------------------------
def _write_lock(out: Path, **holder) -> Path:
    import socket

    from backbone_router.train.training.rundir import _process_start

    out.mkdir(parents=True, exist_ok=True)
    pid = holder.get("pid", os.getpid())
    holder = {"pid": pid, "pid_start": _process_start(pid), "host": socket.gethostname(), "script": "finetune",
              "started": "2026-01-01 00:00:00", "command": "accelerate launch train/finetune.py", **holder}
    (out / ".lock").write_text(json.dumps(holder))
    return out / ".lock"


def test_a_dir_in_use_is_refused_naming_the_holder_and_nothing_is_written(run_setup, tmp_path):
    from backbone_router.train.training.errors import RunError
    from backbone_router.train.training.rundir import claim_output_dir

    out = tmp_path / "busy"
    with claim_output_dir(out, "compare", outputs=()):  # another run holds the dir (this process, alive)
        with pytest.raises(RunError, match=rf"busy is in use by pid {os.getpid()} on host .* \(compare, started .*\) "
                                           r"and that process is still running; wait for it"):
            finetune(run_setup, out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert not (out / ".lock").exists()
    # a lock written on another host cannot be checked from here: refused, saying how to clear it
    lock = _write_lock(out, host="gpu-node-7", pid=12345)
    with pytest.raises(RunError, match=r"in use by pid 12345 on host 'gpu-node-7' .* on another host, so it cannot be "
                                       r"checked from here; if that run is over, delete .*busy/\.lock"):
        finetune(run_setup, out)
    assert json.loads(lock.read_text())["host"] == "gpu-node-7"


def test_a_stale_lock_is_named_and_replaced(run_setup, tmp_path, capsys):
    out = tmp_path / "stale"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the run that held the lock was killed
    _write_lock(out, pid=gone.pid, pid_start="1")
    assert finetune(run_setup, out) == 0
    assert f"removed a stale lock of {out}: pid {gone.pid} on host" in capsys.readouterr().out
    assert (out / "final").is_dir() and not (out / ".lock").exists()  # released at the end


def test_a_fresh_run_into_a_previous_run_is_refused_unless_overwrite(run_setup, reference_run, tmp_path, capsys):
    from backbone_router.train.training.errors import RunError

    out = tmp_path / "again"
    shutil.copytree(reference_run, out)
    before = dir_hash(out)
    with pytest.raises(RunError, match=r"again holds a previous run \(config\.yaml, metrics\.jsonl, final/, checkpoints/, "
                                       r"tensorboard/\); pass --resume to continue it, --overwrite to replace it"):
        finetune(run_setup, out)
    assert dir_hash(out) == before
    with pytest.raises(RunError, match="pass one of them"):
        finetune(run_setup, out, "--resume", "--overwrite")
    (out / "metrics.jsonl").write_text('{"step": 99, "tasks": {}}\n')  # a line that is not this run's
    (out / "notes.txt").write_text("mine")  # not an output: kept
    assert finetune(run_setup, out, "--overwrite", "train.save_every=4") == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4"]  # no step_2 of the old run
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_run_or_a_config_is_an_error_not_a_quickstart(tmp_path):
    from backbone_router.train.training.errors import RunError

    with pytest.raises(RunError, match=r"--resume: .*empty holds no run \(no config\.yaml\); pass the --output-dir of "
                                       r"an earlier run, or --config to start one"):
        main(["--output-dir", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(RunError, match=r"--resume: no --output-dir given"):
        main(["--resume"])
    assert not (tmp_path / "empty").exists() and not (REPO / "runs" / "quickstart" / ".lock").exists()


def test_pretrain_refuses_a_dir_holding_a_previous_run_before_reading_data(tmp_path):
    from backbone_router.train.training.errors import RunError

    out = tmp_path / "mae"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 10, "loss": 0.5}\n')
    with pytest.raises(RunError, match=r"mae holds a previous run \(metrics\.jsonl\); pass --resume to continue it, "
                                       r"--overwrite to replace it"):
        script_main("pretrain")(["--config", str(REPO / "configs" / "pretrain_mae.yaml"), "--output-dir", str(out),
                       "data.root=/nonexistent"])
    assert (out / "metrics.jsonl").read_text() == '{"step": 10, "loss": 0.5}\n' and not (out / ".lock").exists()


# ---- resume state ------------------------------------------------------------------------------------------------
def test_resume_compares_a_model_section_saved_in_an_older_format_as_it_loads(tmp_path):
    """A run's config.yaml written by format 4 (`stride`, `levels: null`, `coarse_logits: false`, no `cls_taps` /
    `aux_weight`) resumes under format 5 with a config that writes the same model; a model that now resolves to
    another one (the new default pyramid and head) is still refused, naming the keys."""
    from backbone_router.train.training.checkpoints import check_resume_config

    same = {**TINY_RUN, "model": {**TINY_RUN["model"], "head": {**TINY_RUN["model"]["head"], "cls_taps": "level",
                                                                  "aux_weight": 0}}}
    resolved = ExperimentConfig.from_dict(same).to_dict()
    old = json.loads(json.dumps(resolved))
    old["model"] = {k: v for k, v in old["model"].items() if k != "levels"} | {"levels": None, "stride": 8, "format_version": 4}
    old["model"]["head"] = {k: v for k, v in old["model"]["head"].items() if k not in ("cls_taps", "aux_weight")} | {
        "coarse_logits": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_resume_config(tmp_path / "config.yaml", resolved, None, 1, 2, False) is None
    pyramid = ExperimentConfig.from_dict({**TINY_RUN, "model": {k: v for k, v in TINY_RUN["model"].items() if k != "levels"}})
    with pytest.raises(SystemExit, match=r"--resume: the config differs from .*config\.yaml in \['model\.head\.aux_weight', "
                                         r"'model\.head\.cls_taps', 'model\.levels'\]"):
        check_resume_config(tmp_path / "config.yaml", pyramid.to_dict(), None, 1, 2, False)


@pytest.mark.parametrize("step, pattern", [("four", r"'step' must be an integer >= 0, got 'four'"),
                                           (-2, r"'step' must be an integer >= 0, got -2"),
                                           (2.5, r"'step' must be an integer >= 0, got 2\.5")])
def test_resume_refuses_a_trainer_state_with_a_bad_step(run_setup, tmp_path, step, pattern):
    from backbone_router.train.training.errors import RunError

    out = tmp_path / "run"
    assert finetune(run_setup, out, "--stop-at", "2") == 0
    state = out / "checkpoints" / "step_2" / "trainer_state.json"
    state.write_text(json.dumps({"step": step, "world": 1}))
    with pytest.raises(RunError, match=rf"--resume: .*step_2/trainer_state\.json: {pattern}; delete .*step_2 to resume"):
        main(["--output-dir", str(out), "--resume"])
    assert not (out / "final").exists()


def test_resume_with_another_global_batch_is_an_error_unless_asked(run_setup, tmp_path, capsys):
    from backbone_router.train.training.errors import RunError

    out = tmp_path / "run"
    assert finetune(run_setup, out, "--stop-at", "2") == 0  # 1 process x batch 2
    state = out / "checkpoints" / "step_2" / "trainer_state.json"
    state.write_text(json.dumps({"step": 2, "world": 2}))  # as if written by 2 processes x batch 2 = global batch 4
    with pytest.raises(RunError, match=r"written by 2 process\(es\) x train\.batch_size 2 = global batch 4; this run "
                                       r"has 1 x 2 = 2\. pass train\.batch_size=4 to keep the global batch .* or pass "
                                       r"--change-global-batch to go on with global batch 2"):
        main(["--output-dir", str(out), "--resume"])
    assert not (out / "final").exists()
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    assert main(["--output-dir", str(kept), "--resume", "train.batch_size=4"]) == 0  # the same global batch: allowed
    assert "global batch 4 (1 process(es) x 4)" in capsys.readouterr().out
    assert main(["--output-dir", str(out), "--resume", "--change-global-batch"]) == 0
    text = capsys.readouterr().out
    assert "going on with global batch 2 (--change-global-batch)" in text and (out / "final").is_dir()


# ---- one clear error line (train/training/errors.py) ----------------------------------------------------------------------
def test_a_config_error_is_one_line_and_the_traceback_only_with_debug(capsys):
    from backbone_router.train.training.errors import RunError, run_cli

    def bad_config():
        try:
            raise KeyError("eval_size")
        except KeyError as e:  # a chained error, as the config decoder raises
            raise ValueError("configs/x.yaml (with overrides).data: data.eval_size: must be an int >= 1, got 0") from e

    assert run_cli(bad_config, argv=[]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: ValueError: configs/x.yaml (with overrides).data: data.eval_size: must be an int "
                                ">= 1, got 0  [--debug for the traceback]"]
    with pytest.raises(ValueError, match="data.eval_size"):
        run_cli(bad_config, argv=["--debug"])
    assert run_cli(lambda: (_ for _ in ()).throw(RunError("--output-dir x is in use\nby pid 1")), argv=[]) == 2
    assert capsys.readouterr().err == "error: --output-dir x is in use by pid 1  [--debug for the traceback]\n"
    assert run_cli(lambda: sys.exit("--resume: x is missing"), argv=[]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("a bug")), argv=[])


@pytest.mark.slow
def test_a_config_error_under_a_two_process_launch_is_one_line_from_the_main_process(run_setup, tmp_path):
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", str(REPO / "train" / "finetune.py"),
           "--config", str(run_setup / "tiny.yaml"), "--output-dir", str(tmp_path / "x"), "data.eval_size=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ours = [ln for ln in text.splitlines() if ln.startswith("error")]
    assert len(ours) == 1 and ours[0].startswith("error: ") and "data.eval_size: must be an int >= 1, got 0" in ours[0]
    assert "train/training/config.py" not in text and "router/config.py" not in text  # no traceback from any process
    proc = subprocess.run(cmd + ["--debug"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "train/training/config.py" in proc.stderr


# ---- a comparison never loses a finished result (train/experiments/results.py) --------------------------------------------------
COMPARE_TINY = REPO / "configs" / "compare_tiny.yaml"
# Runs train/compare.py with test-only patches: a short process-group timeout (TEST_PG_TIMEOUT_S), a SIGKILL in place
# of writing one result (TEST_KILL_AT_SAVE="<variant>@<seed>"), a slow seed (TEST_SLOW_SEED="<seed>@<seconds>" per variant).
COMPARE_WRAPPER = """
import datetime, os, signal, sys
import torch.distributed as dist
if os.environ.get("TEST_PG_TIMEOUT_S"):
    _init = dist.init_process_group
    def init_process_group(*a, **k):
        k["timeout"] = datetime.timedelta(seconds=float(os.environ["TEST_PG_TIMEOUT_S"]))
        return _init(*a, **k)
    dist.init_process_group = init_process_group
if os.environ.get("TEST_KILL_AT_SAVE"):
    import backbone_router.train.experiments.results as results
    _save = results.ResultStore.save
    def save(self, variant, seed, *a, **k):
        if f"{variant}@{seed}" == os.environ["TEST_KILL_AT_SAVE"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(self, variant, seed, *a, **k)
    results.ResultStore.save = save
if os.environ.get("TEST_SLOW_SEED"):
    import time
    import backbone_router.train.experiments.comparison as comparison
    slow_seed, seconds = os.environ["TEST_SLOW_SEED"].split("@")
    _build = comparison.build_router
    def build_router(variant, shared, seed, priors):
        if seed == int(slow_seed):
            time.sleep(float(seconds))
        return _build(variant, shared, seed, priors)
    comparison.build_router = build_router
import runpy
sys.argv[0] = os.path.join(os.getcwd(), "train", "compare.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def compare_args(out: Path, cache: Path, *extra: str) -> list[str]:
    flags = [a for a in extra if a.startswith("--")]  # before the overrides (argparse does not intermix them)
    return ["--config", str(COMPARE_TINY), "--output-dir", str(out), *flags, f"compare.cache_dir={cache}",
            "compare.variants=[concat, gated_token]", *[a for a in extra if a not in flags]]


def run_compare(tmp_path: Path, args: list[str], processes: int = 1, **env) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "compare_wrapper.py"
    wrapper.write_text(COMPARE_WRAPPER)
    if processes == 1:
        cmd = [sys.executable, str(wrapper), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--multi_gpu", "--num_processes", str(processes), str(wrapper), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_a_killed_comparison_keeps_its_results_reports_them_and_resumes_to_the_same_numbers(tmp_path):
    report = script_main("report")  # train/report.py's main

    cache, seeds = tmp_path / "cache", "compare.seeds=[0, 1]"
    full = run_compare(tmp_path, compare_args(tmp_path / "full", cache, seeds))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    killed = run_compare(tmp_path, compare_args(out, cache, seeds), TEST_KILL_AT_SAVE="concat@1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.relative_to(out / "results").as_posix() for p in (out / "results").glob("*/seed_*.json")) == [
        "concat/seed_0.json", "gated_token/seed_0.json"]  # seed 0 was on disk the moment it was done
    assert not (out / "results.json").exists()
    # a report from what is done, naming what is missing
    assert report([str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["seed"] for r in rows} == {0} and {r["variant"] for r in rows} == {"concat", "gated_token"}
    md = (out / "results.md").read_text()
    assert "- concat: not finished: seed(s) [1] missing" in md and "- gated_token: not finished: seed(s) [1]" in md
    # a fresh run into it is refused; --resume trains seed 1 only and ends with the uninterrupted numbers
    from backbone_router.train.training.errors import RunError

    with pytest.raises(RunError, match=r"killed holds a previous run \(config\.yaml, results/, .*\); pass --resume"):
        script_main("compare")(compare_args(out, cache, seeds))
    resumed = run_compare(tmp_path, compare_args(out, cache, seeds, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume: 2 of 4 (variant, seed) results done; training seed(s) [1]" in resumed.stdout
    key = lambda r: (r["variant"], r["seed"], r["task"], r["metric"])  # noqa: E731
    a = sorted(json.loads((out / "results.json").read_text()), key=key)
    b = sorted(json.loads((tmp_path / "full" / "results.json").read_text()), key=key)
    assert a == b
    # a result trained under other settings is never mixed in
    with pytest.raises(RunError, match=r"concat/seed_0\.json was trained with other settings \(they differ in "
                                       r"\['train\.lr'\]\); resume with the settings of that run"):
        script_main("compare")(compare_args(out, cache, seeds, "--resume", "train.lr=0.01"))
    assert a == sorted(json.loads((out / "results.json").read_text()), key=key)  # nothing was touched


def test_comparison_results_saved_in_an_older_model_format_resume_as_they_load(tmp_path):
    """A pair saved when the model sections were format 4 (`stride`, `levels: null`, no `cls_taps` / `aux_weight`) is
    the same pair for a format-5 comparison of the same model; another model is still refused, naming the keys."""
    from backbone_router.train.experiments.results import ResultStore
    from backbone_router.train.training.errors import RunError

    same = {**TINY_RUN["model"], "head": {**TINY_RUN["model"]["head"], "cls_taps": "level", "aux_weight": 0}}
    resolved = ExperimentConfig.from_dict({**TINY_RUN, "model": same}).to_dict()
    old = json.loads(json.dumps(resolved))
    old["model"] = {k: v for k, v in old["model"].items() if k != "levels"} | {"levels": None, "stride": 8, "format_version": 4}
    old["model"]["head"] = {k: v for k, v in old["model"]["head"].items() if k not in ("cls_taps", "aux_weight")}
    row = {"variant": "g", "seed": 0, "task": "shape_seg", "metric": "fg_iou", "value": 0.5}
    ResultStore(tmp_path, old, {"g": {"kind": "routed", **old["model"]}}).save("g", 0, [row], [], [], 1.0)
    assert ResultStore(tmp_path, resolved, {"g": {"kind": "routed", **resolved["model"]}}).load("g", 0)["rows"] == [row]
    pyramid = {**resolved["model"], "levels": [4, 8, 16, 32]}
    with pytest.raises(RunError, match=r"g/seed_0\.json was trained with other settings \(they differ in "
                                       r"\['model\.levels', 'variant_model\.levels'\]\)"):
        ResultStore(tmp_path, {**resolved, "model": pyramid}, {"g": {"kind": "routed", **pyramid}}).load("g", 0)


@pytest.mark.slow
def test_uneven_seeds_on_two_processes_with_a_short_timeout_lose_nothing(tmp_path):
    # 3 seeds on 2 processes: process 1 is done with its one seed long before process 0 with its two (seed 2 made
    # slow: 2 x 5 s). With a 4 s process-group timeout, a process waiting at a collective for the other (as the old
    # final gather did) dies.
    out = tmp_path / "uneven"
    proc = run_compare(tmp_path, compare_args(out, tmp_path / "cache", "compare.seeds=[0, 1, 2]"), processes=2,
                       TEST_PG_TIMEOUT_S="4", TEST_SLOW_SEED="2@5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["seed"]) for r in rows} == {(v, s) for v in ("concat", "gated_token") for s in (0, 1, 2)}
    assert not list((out / "results").glob(".plan-*")) and not (out / ".lock").exists()


# ---- portable saved models ----------------------------------------------------------------------------------------
def test_a_local_dir_extractor_rebuilds_from_its_architecture_without_the_folder(saved_extractor_dir, tmp_path):
    from backbone_router.extractors.local_dir import local_dir_architecture

    folder = tmp_path / "mae"
    shutil.copytree(saved_extractor_dir, folder)
    spec = f"local-dir:{folder}"
    arch = local_dir_architecture(spec)
    original = create_extractor(spec).eval()
    x = torch.rand(1, 3, 32, 32)
    shutil.rmtree(folder)  # the run folder of the pretraining is gone
    with pytest.raises(FileNotFoundError, match=r"mae/config\.json does not exist"):
        create_extractor(spec, pretrained=False)
    rebuilt = create_extractor(spec, pretrained=False, architecture=arch).eval()
    rebuilt.load_state_dict(original.state_dict())  # the weights a Router saved in its own model.safetensors
    torch.testing.assert_close(rebuilt(x)["pooled"], original(x)["pooled"], rtol=0, atol=0)
    assert rebuilt.info.family == original.info.family and rebuilt.info.layers == original.info.layers
    with pytest.raises(ValueError, match=r"mae \(architecture=\): 'format' must be 'backbone-router-extractor'"):
        create_extractor(spec, pretrained=False, architecture={"model_name": "vit_small_patch16_224"})


def test_a_router_holding_its_extractor_weights_loads_after_the_local_dir_is_gone(saved_extractor_dir, tmp_path):
    folder = tmp_path / "mae"
    shutil.copytree(saved_extractor_dir, folder)
    cfg = router_config()
    cfg["extractors"] = [{"spec": f"local-dir:{folder}", "name": "p16", "frozen": False}]  # fine-tuned: saved inside
    model = Router(RouterConfig.from_dict(cfg)).eval()
    saved = model.save_pretrained(tmp_path / "router")
    x = torch.rand(1, 3, 32, 32)
    expected = model(x, task="seg")["seg"]
    shutil.rmtree(folder)
    loaded = Router.from_pretrained(saved)
    torch.testing.assert_close(loaded(x, task="seg")["seg"], expected, rtol=0, atol=0)


def test_predict_shrinks_images_above_the_pixel_budget_and_answers_at_the_original_size(saved_router):
    model = saved_router[0]
    image = torch.rand(3, 120, 200)
    with pytest.warns(UserWarning, match=r"images\[0\]"):
        (small,) = model.predict([image], task="seg", max_pixels=6000)
    (full,) = model.predict([image], task="seg", max_pixels=None)
    small, full = small["mask"], full["mask"]
    assert small.shape == full.shape == (120, 200)
    assert (small == full).float().mean() > 0.5  # the same image at ~1/4 of the pixels: mostly the same classes
    assert model.predict([], task="cls") == []


# ---- saved and downloaded configs are data (issue 26) ------------------------------------------------------------
@pytest.fixture
def new_repo_id():
    """Fresh hub repo ids whose cache folders are removed after the test."""
    from backbone_router.extractors.io.model_files import repo_cache_dir

    made = []
    yield lambda kind="router": made.append(f"org/{kind}-{os.urandom(4).hex()}") or made[-1]
    for repo in made:
        shutil.rmtree(repo_cache_dir(repo), ignore_errors=True)


def frozen_router_config(spec: str, checkpoint: str | None = None) -> dict:
    """A Router whose one extractor is frozen and pretrained from a local file or folder: left out of the save."""
    kwargs = TINY_VIT if checkpoint else {}
    return {**router_config(), "extractors": [{"spec": spec, "name": "p16", "checkpoint": checkpoint, "kwargs": kwargs}]}


def tiny_vit_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(create_extractor("timm:vit_small_patch16_224", pretrained=False, **TINY_VIT).model.state_dict(), str(path))
    return path


@pytest.mark.parametrize("kwargs, key", [
    ({"checkpoint_path": "EVIL"}, "kwargs.checkpoint_path"),
    ({"pretrained_cfg_overlay": {"file": "EVIL"}}, "kwargs.pretrained_cfg_overlay"),
    ({"architecture": {"architecture": "vit_small_patch16_224", "model_args": {**TINY_VIT, "checkpoint_path": "EVIL"},
                       "pretrained_cfg": {}}}, "kwargs.architecture.model_args.checkpoint_path"),
    ({"architecture": {"architecture": "local-dir:/etc", "pretrained_cfg": {}}}, "kwargs.architecture.architecture"),
    ({"act_layer": "EVIL"}, "kwargs.act_layer"),
])
def test_saved_config_kwargs_that_name_a_file_are_refused_and_the_pickle_never_runs(saved_router, tmp_path, kwargs, key):
    marker = tmp_path / "marker.txt"
    evil = plant_pickle(tmp_path / "evil.pth", marker)
    d = tmp_path / "m"
    shutil.copytree(saved_router[1], d)
    config = json.loads((d / "config.json").read_text())
    config["extractors"][0]["kwargs"] = json.loads(json.dumps(kwargs).replace("EVIL", str(evil)))
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config\.json.*extractors\[p16\]\.{re.escape(key)}: (.*refused|.* is not a model name)"):
        Router.from_pretrained(d)
    # the same kwargs straight to the factory, and timm's own loader (timm >= 1.0.26: weights_only=True by default)
    with pytest.raises(ValueError, match=r"kwargs\.checkpoint_path: refused"):
        create_extractor("timm:vit_small_patch16_224", pretrained=False, checkpoint_path=str(evil), **TINY_VIT)
    import timm

    with pytest.raises(Exception, match="(?i)weights.only"):
        timm.models.load_checkpoint(timm.create_model("vit_small_patch16_224", **TINY_VIT), str(evil))
    assert not marker.exists(), "pickled code ran"


def test_timm_hf_hub_and_hf_dir_pickles_are_refused_by_our_reader_naming_the_file(tmp_path, new_repo_id):
    from timm.models import save_for_hf

    marker = tmp_path / "marker.txt"
    folder = tmp_path / "timm_repo"
    save_for_hf(create_extractor("timm:vit_small_patch16_224", pretrained=False, **TINY_VIT).model, str(folder),
                model_args=TINY_VIT, safe_serialization=False)
    plant_pickle(folder / "pytorch_model.bin", marker)
    repo = new_repo_id("timm")
    cache_snapshot(repo, folder)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused or unreadable with torch\.load\(weights_only=True\)"):
        create_extractor(f"timm:hf-hub:{repo}")
    import transformers as tf

    hf = tmp_path / "hf"
    tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=30,
                    patch_size=2).save_pretrained(hf)
    plant_pickle(hf / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"hf/pytorch_model\.bin: refused or unreadable with torch\.load\(weights_only=True\)"):
        create_extractor(f"hf:{hf}")
    assert not marker.exists(), "pickled code ran"


def test_a_hub_routers_paths_stay_inside_its_snapshot(tmp_path, new_repo_id):

    outside = tiny_vit_weights(tmp_path / "outside.safetensors", seed=1)
    torch.manual_seed(0)
    model = Router(RouterConfig.from_dict(frozen_router_config("timm:vit_small_patch16_224", str(outside)))).eval()
    folder = model.save_pretrained(tmp_path / "m")
    assert model.saved_extractors() == []
    config = json.loads((folder / "config.json").read_text())
    for checkpoint in (str(outside), "../../../../../outside.safetensors", os.path.relpath(outside, folder)):
        config["extractors"][0]["checkpoint"] = checkpoint
        (folder / "config.json").write_text(json.dumps(config))
        repo = new_repo_id()
        cache_snapshot(repo, folder)
        with pytest.raises(ValueError, match=r"config\.json: extractors\[p16\]\.checkpoint: .* is outside the "
                                             r"downloaded model's snapshot"):
            Router.from_pretrained(repo)
    # a file inside the snapshot loads, and gives the model's outputs
    shutil.copy(outside, folder / "ext.safetensors")
    config["extractors"][0]["checkpoint"] = "ext.safetensors"
    (folder / "config.json").write_text(json.dumps(config))
    repo = new_repo_id()
    cache_snapshot(repo, folder)
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(Router.from_pretrained(repo)(images, task="seg")["seg"], model(images, task="seg")["seg"])


def test_relative_local_paths_resolve_against_the_model_folder_and_frozen_weights_are_pinned(
        saved_extractor_dir, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(saved_extractor_dir, work / "ext")
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    model = Router(RouterConfig.from_dict(frozen_router_config("local-dir:ext"))).eval()
    folder = model.save_pretrained(work / "models" / "m")
    saved = json.loads((folder / "config.json").read_text())["extractors"][0]
    assert saved["spec"] == "local-dir:../../ext" and len(saved["sha256"]) == 64
    # another working directory holding a folder of the same name with other weights
    other = elsewhere / "ext"
    shutil.copytree(saved_extractor_dir, other)
    tiny_vit_weights(other / "model.safetensors", seed=5)
    monkeypatch.chdir(elsewhere)
    images = torch.rand(1, 3, 32, 32)
    loaded = Router.from_pretrained(folder)
    assert torch.equal(loaded(images, task="seg")["seg"], model(images, task="seg")["seg"])
    # the pinned weights changed: a one-line error naming the file
    tiny_vit_weights(work / "ext" / "model.safetensors", seed=6)
    with pytest.raises(ValueError, match=r"ext/model\.safetensors: sha256 \w+\.\.\. differs from the \w+\.\.\. recorded "
                                         r"in .*config\.json: extractors\[p16\]\.sha256"):
        Router.from_pretrained(folder)


# ---- a finished run is immutable (issue 26) ----------------------------------------------------------------------
def test_resume_of_a_finished_run_is_a_no_op_and_final_stays(run_setup, reference_run, tmp_path, capsys):
    out = tmp_path / "done"
    shutil.copytree(reference_run, out)
    card = (out / "final" / "README.md").read_text()
    assert "mIoU" in card  # the card holds the run's metrics
    before = dir_hash(out)
    for extra in ((), ("train.max_steps=2",), ("train.max_steps=8",)):
        assert main(["--output-dir", str(out), "--resume", *extra]) == 0
        said = capsys.readouterr().out
        assert f"--resume: {out} is a finished run (final/ holds the model of step 4); nothing to do" in said
        assert dir_hash(out) == before  # final/, its card, config.yaml and metrics.jsonl unchanged


KILL_DURING_FINAL = """
import os, signal, sys
from pathlib import Path
from backbone_router import Router
original = Router.save_pretrained
def save_pretrained(self, directory, **kw):  # final/: write its temp dir, cut its card short, then kill -9
    original(self, directory, **kw)
    card = Path(directory) / "README.md"
    card.write_text(card.read_text()[:200])
    os.kill(os.getpid(), signal.SIGKILL)
Router.save_pretrained = save_pretrained
import runpy
sys.argv[0] = os.path.join(os.getcwd(), "train", "finetune.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill9_while_final_is_written_then_resume_writes_final_with_its_metrics(run_setup, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_FINAL, "--config", str(run_setup / "tiny.yaml"),
                           "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / ".tmp_final").is_dir() and not (out / "final").exists()
    assert main(["--output-dir", str(out), "--resume"]) == 0
    assert not (out / ".tmp_final").exists()
    card, reference_card = (out / "final" / "README.md").read_text(), (reference_run / "final" / "README.md").read_text()
    assert "mIoU" in card and len(card) > 0.9 * len(reference_card)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in map(json.loads, (reference_run / "metrics.jsonl").read_text().splitlines())]


# ---- one line, not a traceback; inputs users have (issue 26) -------------------------------------------------------
def test_pretrained_weights_missing_offline_are_one_line_naming_the_cache(run_setup, tmp_path, capsys):
    from backbone_router.train.training.errors import run_cli

    cfg = yaml.safe_load((run_setup / "tiny.yaml").read_text())
    cfg["model"]["extractors"] = [{"spec": "timm:resnet18.a1_in1k", "name": "r18"}]  # pretrained, not in the cache
    (tmp_path / "pretrained.yaml").write_text(yaml.safe_dump(cfg))
    code = run_cli(lambda: main(["--config", str(tmp_path / "pretrained.yaml"), "--output-dir", str(tmp_path / "out")]),
                   argv=[])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]  # not progress bars
    assert code == 2 and len(err) == 1, err
    assert re.match(r"error: (FileNotFoundError: )?timm:resnet18\.a1_in1k: no pretrained weights could be loaded", err[0])
    assert "HF_HUB_OFFLINE" in err[0]


@pytest.mark.parametrize("override, pattern", [
    ("data.image_size=100000", r"data\.image_size: 100000 is 10,000,000,000 pixels per image, above the budget"),
    ("data.eval_size=[5000, 5000]", r"data\.eval_size: \[5000, 5000\] is 25,000,000 pixels per image"),
    ("data.tasks.0.image_size=8192", r"data\.tasks\[shape_seg\]\.image_size: 8192 is 67,108,864 pixels"),
])
def test_sizes_above_the_pixel_budget_are_refused_at_load(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        ExperimentConfig.from_dict(TINY_RUN, [override])


def test_report_on_a_truncated_result_file_is_one_line_naming_it(tmp_path, capsys):
    results = tmp_path / "cmp" / "results"
    (results / "gated").mkdir(parents=True)
    (results / "meta.json").write_text(json.dumps({"meta": {"seeds": [0]}, "settings": {"gated": {}}}))
    (results / "gated" / "seed_0.json").write_text('{"variant": "gated", "seed": 0, "ro')  # cut short
    assert script_main("report")([str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: .*results/gated/seed_0\.json: not a readable result", err[0]), err


def test_a_peer_checkpoint_that_is_a_pickle_or_truncated_is_an_error_naming_it(tmp_path):
    from backbone_router.train.experiments.peers import encoder_state

    marker = tmp_path / "marker.txt"
    evil = plant_pickle(tmp_path / "mnv2.pth", marker)
    with pytest.raises(ValueError, match=r"compare\.peer_checkpoint: .*mnv2\.pth: refused or unreadable with torch\.load\(weights_only=True\)"):
        encoder_state(evil)
    assert not marker.exists(), "pickled code ran"
    cut = tmp_path / "mnv2.safetensors"
    save_file({"features.0.0.weight": torch.zeros(4, 3, 3, 3)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"compare\.peer_checkpoint: .*mnv2\.safetensors: not a readable safetensors file"):
        encoder_state(cut)


def test_half_and_double_tensors_and_empty_batches_work_in_forward_and_predict(saved_router):
    model = saved_router[0]
    images = torch.rand(2, 3, 32, 32)
    for task in ("seg", "cls"):
        ref = model(images, task=task)[task]
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            x = images.to(dtype)
            assert torch.allclose(model(x, task=task)[task], model(x.float(), task=task)[task])
            assert len(model.predict(x, task=task)) == 2
        empty = model(images[:0], task=task)
        assert empty[task].shape == (0, *ref.shape[1:]) and empty["gate"].shape[0] == 0
        assert len(model.predict(images[:0], task=task)) == 0


@pytest.mark.parametrize("reader", list(READERS))
def test_pil_mode_f_images_in_0_1_keep_their_values(tmp_path, reader):
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "f.tiff"
    Image.fromarray(values, mode="F").save(path)
    got = READERS[reader](path)
    assert torch.allclose(got[0], torch.from_numpy(values))  # before: all zeros (Pillow's convert truncates floats)
    assert torch.allclose(to_image_tensor(Image.fromarray(values, mode="F"))[0], torch.from_numpy(values))
    Image.fromarray(values * 255, mode="F").save(tmp_path / "f255.tiff")
    with pytest.raises(ValueError, match=r"(f255\.tiff|image): float values in \[0, 255\]; expected \[0, 1\]"):
        READERS[reader](tmp_path / "f255.tiff")


@pytest.mark.parametrize("override, pattern", [
    ("train.lr=nan", r"train\.lr: expected a finite number, got nan"),
    ("train.lr=inf", r"train\.lr: expected a finite number, got inf"),
    ("train.weight_decay=nan", r"train\.weight_decay: expected a finite number, got nan"),
    ("train.grad_clip=nan", r"train\.grad_clip: expected a finite number, got nan"),
    ("train.betas=[0.9, 1.5]", r"train\.betas: expected two values in \[0, 1\), got \[0\.9, 1\.5\]"),
    ("train.seed=-1", r"train\.seed: must be an int >= 0, got -1"),
    ("train.loss_weights.shape_seg=heavy", r"train\.loss_weights\.shape_seg.*: expected a (finite )?number"),
    ("train.loss_weights.shape_seg=-1", r"train\.loss_weights\.shape_seg: expected a finite number >= 0, got -1"),
    ("data.tasks.0.weight=nan", r"data\.tasks\[shape_seg\]\.weight: must be a finite number >= 0, got nan"),
    ("data.color_jitter=nan", r"data\.color_jitter: expected a finite strength >= 0"),
    ("data.color_jitter=-0.1", r"data\.color_jitter: expected a finite strength >= 0"),
    ("model.head.dropout=1.5", r"head\.dropout: expected a probability in \[0, 1\), got 1\.5"),
    ("model.head.dropout=nan", r"head\.dropout: expected a probability in \[0, 1\), got nan"),
])
def test_non_finite_and_out_of_range_values_name_the_key(override, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        ExperimentConfig.from_dict(TINY_RUN, [override])
    extractors = [{**TINY_RUN["model"]["extractors"][0], "unfreeze_last": -2}]
    with pytest.raises(ValueError, match=r"extractors\[p16\]\.unfreeze_last: expected an integer >= 0"):
        ExperimentConfig.from_dict({**TINY_RUN, "model": {**TINY_RUN["model"], "extractors": extractors}})


# ---- config files: one reader, router.config.load_yaml_or_json (issue 26) -------------------------------------------
@pytest.mark.parametrize("name, content, pattern", [
    ("dup.yaml", b"train:\n  lr: 0.1\n  lr: 0.2\n", r"dup\.yaml: duplicate key 'lr' \(lines 2 and 3\); a key may appear once"),
    ("two_train.yaml", b"train: {lr: 0.1}\nmodel: {}\ntrain: {seed: 1}\n", r"duplicate key 'train' \(lines 1 and 3\)"),
    ("flow.yaml", b"train: {lr: 0.1, lr: 0.2}\n", r"duplicate key 'lr' \(twice on line 1\)"),
    ("dup.json", b'{"train": {"lr": 0.1, "lr": 0.2}}', r"dup\.json: duplicate key 'lr'; a key may appear once"),
    ("nan.json", b'{"train": {"lr": NaN}}', r"nan\.json: train\.lr is NaN; a config value must be a finite number"),
    ("inf.json", b'{"train": {"betas": [0.9, -Infinity]}}', r"inf\.json: train\.betas\[1\] is -Infinity"),
    ("utf16.yaml", "train:\n  lr: 0.1\n".encode("utf-16"), r"utf16\.yaml: UTF-16 text \(byte-order mark fffe\); config "
                                                           r"files are UTF-8"),
    ("utf16.json", '{"train": {}}'.encode("utf-16-le"), r"utf16\.json: holds a NUL byte at offset 1 \(binary data or "
                                                        r"UTF-16 without a byte-order mark\)"),
    ("binary.yaml", bytes(range(256)), r"binary\.yaml: holds a NUL byte at offset 0"),
    ("latin1.yaml", "name: café\n".encode("latin-1"), r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"),
])
def test_config_files_with_duplicate_keys_nan_or_not_utf8_are_refused_naming_file_and_key(tmp_path, name, content,
                                                                                           pattern):
    from backbone_router.train.selfsup.pretrain_config import load_pretrain_config

    path = tmp_path / name
    path.write_bytes(content)
    for read in (ExperimentConfig.from_file, RouterConfig.from_file, load_pretrain_config):  # every reader is this one
        with pytest.raises(ValueError, match=pattern):
            read(path)


def test_a_config_file_error_is_one_line_and_good_files_still_load(run_setup, tmp_path, capsys):
    from backbone_router.router.config import load_yaml_or_json
    from backbone_router.train.training.errors import run_cli

    text = (run_setup / "tiny.yaml").read_text()
    (tmp_path / "two.yaml").write_text(text + "train: {max_steps: 8}\n")  # a second train: section at the end
    code = run_cli(lambda: main(["--config", str(tmp_path / "two.yaml"), "--output-dir", str(tmp_path / "out")]), argv=[])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and re.match(r"error: .*two\.yaml: duplicate key 'train' \(lines \d+ and \d+\)",
                                                    err[0]), err
    assert not (tmp_path / "out" / "checkpoints").exists()
    # what stays readable: a JSON config with a UTF-8 BOM, YAML merge keys overriding merged ones, 1e-3 as a float
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(TINY_RUN).encode())
    assert ExperimentConfig.from_file(tmp_path / "bom.json").train.max_steps == 4
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 1e-3, seed: 2}\ntrain:\n  <<: *b\n  seed: 3\n")
    assert load_yaml_or_json(tmp_path / "merge.yaml")["train"] == {"lr": 0.001, "seed": 3}


# ---- dataset folders: meta.json typed, stems once (train/training/data.py, issue 26) ------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    """A small synthetic dataset folder (meta.json ignore_index 255) to break."""
    return write_synthetic_dataset(tmp_path / "data", "shapes", n_train=6, n_val=2, size=16, ignore_border=1, seed=0)


def load_shapes(folder: Path, task_type: str = "seg", **task):
    from backbone_router.router.config import TaskConfig
    from backbone_router.train.training.config import DataConfig, DataTaskConfig
    from backbone_router.train.training.data import load_task_data

    data = DataConfig(tasks=[DataTaskConfig("t", folder.name)], image_size=16, eval_size=16)
    return load_task_data(TaskConfig("t", task_type, **task), data.task("t"), folder.parent, data)


@pytest.mark.parametrize("change, pattern", [
    ({"ignore_index": "void"}, r"meta\.json: 'ignore_index' must be an int >= 0 .* or null, got 'void'"),
    ({"ignore_index": 2.5}, r"'ignore_index' must be an int >= 0 .*, got 2\.5"),
    ({"ignore_index": -1}, r"'ignore_index' must be an int >= 0 .*, got -1"),
    ({"channels": 5}, r"meta\.json: 'channels' must be 1 \(greyscale\) or 3 \(RGB\), got 5"),
    ({"channels": True}, r"'channels' must be 1 \(greyscale\) or 3 \(RGB\), got True"),
    ({"classes": "background,shape"}, r"meta\.json: 'classes' must be a list of class names \(strings\), got 'backgr"),
    ({"classes": ["background", 1]}, r"'classes' must be a list of class names \(strings\), got \['background', 1\]"),
    ({"image_classes": None}, r"'image_classes' must be a list of class names"),
])
def test_meta_json_values_are_typed_naming_the_key(dataset, change, pattern):
    meta = json.loads((dataset / "meta.json").read_text())
    (dataset / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match=pattern):
        load_shapes(dataset)


def test_meta_json_and_config_ignore_index_must_agree_and_stems_are_listed_once(dataset):
    assert load_shapes(dataset).task.ignore_index == 255  # taken from meta.json
    assert load_shapes(dataset, ignore_index=255).task.ignore_index == 255  # the same value: fine
    with pytest.raises(ValueError, match=r"model\.tasks\[t\]\.ignore_index 0 differs from .*shapes/meta\.json "
                                         r"ignore_index 255; .* leave ignore_index out of the config"):
        load_shapes(dataset, ignore_index=0)  # every background pixel would be left out of loss and metrics
    meta = dataset / "meta.json"
    meta.write_text(meta.read_text().replace("{", '{"classes": ["a", "b"], ', 1))  # a key twice in meta.json
    with pytest.raises(ValueError, match=r"meta\.json: duplicate key 'classes'"):
        load_shapes(dataset)

    splits, labels = dataset / "splits.csv", dataset / "labels.csv"
    meta.write_text(meta.read_text().replace('{"classes": ["a", "b"], ', "{", 1))
    good_splits, good_labels = splits.read_text(), labels.read_text()
    splits.write_text(good_splits + "shape_00001,train\n")  # listed twice in one split (line 3 and line 10)
    with pytest.raises(ValueError, match=r"splits\.csv: stem 'shape_00001' is listed twice in split 'train' \(lines 3 "
                                         r"and 10\); list each stem once"):
        load_shapes(dataset)
    splits.write_text(good_splits)
    first = good_labels.splitlines()[2]  # shape_00001,<name>,<idx>
    stem, name, idx = first.split(",")
    other = (int(idx) + 1) % 3
    labels.write_text(good_labels + first + "\n")  # the same class twice: harmless, loads
    assert len(load_shapes(dataset, "cls").train) == 6
    labels.write_text(good_labels + f"{stem},,{other}\n")
    with pytest.raises(ValueError, match=rf"labels\.csv: stem '{stem}' has class_idx {idx} \({name}\) on line 3 and "
                                         rf"class_idx {other} on line 10; a stem has one class"):
        load_shapes(dataset, "cls")
    from backbone_router.train.training.data import read_image_labels

    with pytest.raises(ValueError, match=rf"labels\.csv: stem '{stem}' has class_idx {idx}"):
        read_image_labels(dataset)  # train/ceiling.py's reader: the same check


@pytest.mark.parametrize("synthetic, error, pattern", [
    ({"n_trian": 8}, ValueError, r"data\.synthetic: unknown key\(s\) \['n_trian'\] \(did you mean 'n_train'\?\)"),
    ({"sise": 32}, ValueError, r"data\.synthetic: unknown key\(s\) \['sise'\] \(did you mean 'size'\?\)"),
    ({"size": "big"}, TypeError, r"data\.synthetic\.size: expected int, got str 'big'"),
    ({"n_val": None}, TypeError, r"data\.synthetic\.n_val: expected int, got NoneType None"),
    ({"seed": -1}, ValueError, r"data\.synthetic\.seed: must be an int >= 0, got -1"),
    ({"size": 100000}, ValueError, r"data\.synthetic\.size: 100000 is 10,000,000,000 pixels per image, above the budget"),
    ({"name": "../elsewhere"}, ValueError, r"data\.synthetic\.name: '\.\./elsewhere' must be a folder name"),
    (True, TypeError, r"data\.synthetic: expected a mapping for SyntheticConfig, got bool"),
])
def test_bad_keys_under_data_synthetic_are_named_with_the_nearest_key(synthetic, error, pattern):
    # before: "data.synthetic: {...} does not match SyntheticConfig | None" for all but the name and seed, which passed
    with pytest.raises(error, match=pattern):
        ExperimentConfig.from_dict({**TINY_RUN, "data": {**TINY_RUN["data"], "synthetic": synthetic}})
    with pytest.raises(ValueError, match=r"override 'data\.synthetic\.n_trian': unknown key .*did you mean "
                                         r"'data\.synthetic\.n_train'"):
        ExperimentConfig.from_dict({**TINY_RUN, "data": {**TINY_RUN["data"], "synthetic": {}}}, ["data.synthetic.n_trian=8"])
    assert ExperimentConfig.from_dict({**TINY_RUN, "data": {**TINY_RUN["data"], "synthetic": {"name": "shapes.v2"}}})


@pytest.mark.parametrize("content, reason", [
    (b"garbage", r"not JSON: 'garbage'"),
    (b"", r"not JSON: ''"),
    (b"[1, 2]", r"a JSON list, not an object"),
    (b'{"pid": "abc"}', r"'pid' 'abc' is not a process id"),
    (b'{"pid": -5, "host": "h"}', r"'pid' -5 is not a process id"),  # os.kill(-5, 0) would probe a process group
    (b'{"pid": 99999999999999999999, "host": "h"}', r"'pid' 99999999999999999999 is not a process id"),
    (b'{"pid": 7}', r"'host' None is not a host name"),
    (b"\xff\xfe\x00\x01", r"UnicodeDecodeError|utf-8"),
    (None, r"Is a directory"),
])
def test_a_lock_file_holding_garbage_is_one_line_naming_it_and_is_left_alone(tmp_path, content, reason):
    from backbone_router.train.training.errors import RunError
    from backbone_router.train.training.rundir import claim_output_dir

    out = tmp_path / "run"
    lock = out / ".lock"
    if content is None:
        lock.mkdir(parents=True)
    else:
        out.mkdir()
        lock.write_bytes(content)
    with pytest.raises(RunError, match=rf"run/\.lock: not a lock file of this package \(.*({reason}).*\); if no run is "
                                       rf"writing to .*run, delete .*run/\.lock and start again"):
        with claim_output_dir(out, "finetune", outputs=("final",)):
            pass
    assert lock.is_dir() if content is None else lock.read_bytes() == content  # not removed, not rewritten
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written


def test_a_garbage_lock_stops_finetune_with_one_line(run_setup, tmp_path, capsys):
    from backbone_router.train.training.errors import run_cli

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("garbage")
    assert run_cli(lambda: finetune(run_setup, out), argv=[]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and re.match(r"error: .*run/\.lock: not a lock file of this package \(not JSON: 'garbage'\); "
                                      r"if no run is writing to .*run, delete .*run/\.lock and start again", err[0]), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---- integrity: the feature cache checks its shards (train/experiments/feature_cache.py, issue 26) ------------------------------
def test_a_flipped_byte_in_a_feature_cache_shard_is_named_and_recomputed(tmp_path):
    import stat
    import warnings

    from backbone_router.train.experiments.feature_cache import FeatureCache

    torch.manual_seed(0)
    ext = create_extractor("timm:vit_small_patch16_224", pretrained=False, **TINY_VIT).freeze().eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, root = ["a", "b", "c"], tmp_path / "cache"
    old = os.umask(0o022)
    try:
        first = FeatureCache(root).get_or_compute(ext, ids, images, view=0, transform="eval:32")
    finally:
        os.umask(old)
    (shard,) = root.glob("*/shard-*.safetensors")
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    entry = FeatureCache.entry_key("b", 0, "eval:32")
    start, end = tensor_byte_range(shard, f"{entry}/pooled")
    flip_byte(shard, (start + end) // 2)  # one byte of b's pooled vector: safetensors alone reads it without a word

    with pytest.raises(ValueError, match=rf"{shard.name}: feature-cache entry {entry} \(image 'b', view 0\) tensor\(s\) "
                                         r".*pooled.* do not match their CRC-32 checksum; pass the images to recompute"):
        FeatureCache(root).get_or_compute(ext, ids, None, view=0, transform="eval:32")
    cache, calls = FeatureCache(root), ext.forward_calls
    with pytest.warns(UserWarning, match=rf"{shard.name}: feature-cache entry {entry} \(image 'b', view 0\) .*do not "
                                         r"match their CRC-32 checksum; recomputing it"):
        again = cache.get_or_compute(ext, ids, images, view=0, transform="eval:32")
    assert (cache.misses, cache.hits, ext.forward_calls - calls) == (1, 2, 1)  # only b was computed again
    close = dict(rtol=1e-5, atol=1e-5)  # b alone, not in a batch of 3: float32 rounding apart
    assert torch.allclose(again["pooled"], first["pooled"], **close)
    assert torch.allclose(again["dense"][0], first["dense"][0], **close)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another process now reads b from the newer shard, checked, without a warning
        later = FeatureCache(root)
        out = later.get_or_compute(ext, ids, None, view=0, transform="eval:32")
    assert later.hits == 3 and torch.equal(out["pooled"], again["pooled"])

    # a shard that no longer opens (its header cut) is named, and its entries recomputed
    for s in root.glob("*/shard-*.safetensors"):
        s.write_bytes(s.read_bytes()[:20])
    cache = FeatureCache(root)
    with pytest.warns(UserWarning, match=r"shard-.*\.safetensors: unreadable feature-cache shard"):
        out = cache.get_or_compute(ext, ids, images, view=0, transform="eval:32")
    assert cache.misses == 3 and torch.allclose(out["pooled"], first["pooled"], **close)


def test_every_file_a_run_writes_gets_the_umask_mode(reference_run):
    import stat

    from backbone_router.extractors.io.atomic import current_umask

    want = 0o666 & ~current_umask()  # 0644 under umask 022 (the run ran under this process's umask)
    modes = {str(p.relative_to(reference_run)): stat.S_IMODE(p.stat().st_mode) for p in reference_run.rglob("*")
             if p.is_file()}
    assert {"checkpoints/step_4/model.safetensors", "checkpoints/step_4/trainer_state.json", "final/model.safetensors",
            "final/config.json", "config.yaml", "metrics.jsonl"} <= set(modes)
    assert {k: oct(m) for k, m in modes.items() if m != want} == {}
