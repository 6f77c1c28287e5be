"""Hub-native models through the real cache code path, offline: Router.from_pretrained("org/name") from a Hugging
Face cache layout in the tests' HF_HOME, partial caches, push_to_hub (recorded, no network), the model card."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl

from backbone_router.extractors.io.model_files import looks_like_path, repo_cache_dir
from backbone_router.router import Router, RouterConfig

TINY = {
    "extractors": [
        {"spec": "timm:vit_small_patch16_224", "name": "vit", "pretrained": False, "family": "semantic",
         "kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}},
        {"spec": "timm:resnet10t", "name": "cnn", "pretrained": False, "family": "geometric", "layers": [2, 3]},
    ],
    "tasks": [
        {"name": "seg_a", "type": "seg", "classes": ["bg", "crack"]},
        {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]},
    ],
    "fusion": "gated", "width": 16, "levels": [8, 16],
    "gate": {"granularity": "image", "hidden": 8}, "head": {"seg_hidden": 8, "cls_hidden": 8},
}


def tiny_router(seed: int = 0) -> Router:
    torch.manual_seed(seed)
    return Router(RouterConfig.from_dict(TINY)).eval()


def cache_snapshot(repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `folder`'s files into the HF cache as huggingface_hub lays it out: blobs named by their hash,
    snapshots/<commit>/<file> symlinks to them, refs/<branch or tag> holding the commit. Returns the snapshot."""
    repo = repo_cache_dir(repo_id)
    commit = hashlib.sha1(f"{repo_id}{folder}{uuid.uuid4()}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):  # sub-folders too (sentence-transformers' 1_Pooling/)
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def new_repo_id():
    """Fresh repo ids whose cache folders are removed after the test (the HF_HOME lives for the session)."""
    made = []

    def make(kind: str = "router") -> str:
        made.append(f"org/{kind}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    for rid in made:
        shutil.rmtree(repo_cache_dir(rid), ignore_errors=True)


@pytest.fixture
def repo_id(new_repo_id):
    return new_repo_id()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 40, 56)


def assert_same_outputs(a: Router, b: Router, images: torch.Tensor) -> None:
    for task, key in (("seg_a", "seg"), ("cls_b", "cls")):
        oa, ob = a(images, task=task), b(images, task=task)
        assert torch.equal(oa[key], ob[key]) and torch.equal(oa["gate_levels"], ob["gate_levels"])


def test_from_pretrained_loads_a_repo_id_and_its_revisions_from_the_hf_cache_offline(tmp_path, repo_id, images):
    main, tagged = tiny_router(0), tiny_router(1)
    main.save_pretrained(tmp_path / "main")
    tagged.save_pretrained(tmp_path / "v1")
    snap_main = cache_snapshot(repo_id, tmp_path / "main")
    snap_v1 = cache_snapshot(repo_id, tmp_path / "v1", refs=("v1",))
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    with torch.no_grad():
        assert_same_outputs(Router.from_pretrained(repo_id).eval(), main, images)
        assert_same_outputs(Router.from_pretrained(repo_id, revision="v1").eval(), tagged, images)
        assert_same_outputs(Router.from_pretrained(repo_id, revision=snap_v1.name).eval(), tagged, images)
        # the same files through an explicit cache_dir
        assert_same_outputs(Router.from_pretrained(repo_id, cache_dir=snap_main.parents[2],
                                                   local_files_only=True).eval(), main, images)
    assert sorted(p.name for p in snap_main.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_partial_or_absent_cache_errors_name_the_cache_dir_the_missing_file_and_offline(tmp_path, repo_id):
    tiny_router().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()  # config cached, weights not (an interrupted download)
    snapshot = cache_snapshot(repo_id, tmp_path / "m")
    with pytest.raises(FileNotFoundError) as err:
        Router.from_pretrained(repo_id)
    msg = str(err.value)
    assert str(snapshot) in msg and "lacks model.safetensors" in msg and "HF_HUB_OFFLINE is set" in msg

    with pytest.raises(FileNotFoundError) as err:
        Router.from_pretrained("org/never-cached")
    msg = str(err.value)
    assert str(repo_cache_dir("org/never-cached")) in msg and "HF_HUB_OFFLINE is set" in msg

    with pytest.raises(FileNotFoundError, match=r"revision 'v9'"):
        Router.from_pretrained(repo_id, revision="v9")
    with pytest.raises(FileNotFoundError, match=r"no local folder .*nowhere"):
        Router.from_pretrained(tmp_path / "nowhere")


def test_a_path_looking_name_that_does_not_exist_is_a_missing_folder_before_any_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)

    def no_hub(*args, **kwargs):
        raise AssertionError("a hub lookup for a local path")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    with pytest.raises(FileNotFoundError, match=r"no local folder runs/quickstrat; did you mean 'runs/quickstart'"):
        Router.from_pretrained("runs/quickstrat")
    (tmp_path / "mine").mkdir()  # an existing first component makes a one-slash name a path too
    for name in ("./nothing", "mine/model", "runs/x", f"{tmp_path}/x"):
        with pytest.raises(FileNotFoundError, match=r"no local folder"):
            Router.from_pretrained(name)
    assert not looks_like_path("org/name") and looks_like_path("mine/model")


@pytest.fixture
def recorded_hub(monkeypatch):
    """HfApi.create_repo / upload_folder replaced by recorders: what would be created and uploaded."""
    calls = {}

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kw):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kw):
        folder = Path(folder_path)
        calls["upload_folder"] = {"repo_id": repo_id, "commit_message": commit_message,
                                  "files": sorted(p.name for p in folder.iterdir())}
        shutil.copytree(folder, calls["copy"])  # the temp dir is gone after push_to_hub returns
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_saved_model_and_its_card(tmp_path, recorded_hub, images):
    model = tiny_router()
    recorded_hub["copy"] = tmp_path / "uploaded"
    url = model.push_to_hub("org/my-router", private=True, commit_message="first",
                            card_data={"metrics": {"seg_a": {"mIoU": 0.5}}})
    assert url == "https://huggingface.co/org/my-router/commit/abc"
    assert recorded_hub["create_repo"] == {"repo_id": "org/my-router", "private": True, "exist_ok": True}
    up = recorded_hub["upload_folder"]
    assert up["repo_id"] == "org/my-router" and up["commit_message"] == "first"
    assert up["files"] == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.library_name == "backbone-router" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.metrics == ["mIoU"]
    assert "Router.from_pretrained('org/my-router')" in card.text
    with torch.no_grad():
        assert_same_outputs(Router.from_pretrained(tmp_path / "uploaded").eval(), model, images)


def test_push_to_hub_refuses_extractors_whose_weights_are_local_files(tmp_path, recorded_hub, images):
    data = {**TINY, "extractors": [{**TINY["extractors"][0], "pretrained": True}, TINY["extractors"][1]]}
    weights = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_router().extractors["vit"].model.state_dict(), str(weights))
    data["extractors"][0]["checkpoint"] = str(weights)
    model = Router(RouterConfig.from_dict(data))
    with pytest.raises(ValueError, match=r"extractor\(s\) \['vit'\] take their weights from a local file.*full=True"):
        model.push_to_hub("org/x")
    assert "upload_folder" not in recorded_hub
    recorded_hub["copy"] = tmp_path / "uploaded"
    model.push_to_hub("org/x", full=True)
    assert recorded_hub["upload_folder"]["files"] == ["README.md", "config.json", "model.safetensors"]
    weights.unlink()  # full=True put vit's weights into the upload: a Hub user needs no local file
    with torch.no_grad():
        assert_same_outputs(Router.from_pretrained(tmp_path / "uploaded").eval(), model.eval(), images)


def test_model_card_has_hub_metadata_tasks_extractors_levels_and_gate_tables(tmp_path):
    model = tiny_router()
    heat = tmp_path / "heat.png"
    heat.write_bytes(b"\x89PNG fake")
    gate = {"seg_a": {8: {"vit": 0.2, "cnn": 0.8}, 16: {"vit": 0.4, "cnn": 0.6}},
            "cls_b": {"vit": 0.9, "cnn": 0.1}}
    metrics = {"seg_a": {"mIoU": 0.61234, "per_class_iou": [0.9, 0.3]}, "cls_b": {"accuracy": 0.75}}
    model.save_pretrained(tmp_path / "m", card_data={
        "metrics": metrics, "gate": gate, "datasets": {"seg_a": "org/cracks", "cls_b": "org/shapes"},
        "license": "apache-2.0", "gate_image": str(heat)})
    assert (tmp_path / "m" / "gate_heatmap.png").read_bytes() == heat.read_bytes()
    card = ModelCard.load(tmp_path / "m" / "README.md")
    d = card.data
    assert (d.library_name, d.pipeline_tag, d.license) == ("backbone-router", "image-segmentation", "apache-2.0")
    assert d.tags == ["backbone-router", "image-classification", "image-segmentation", "fusion-gated", "timm"]
    assert d.datasets == ["org/cracks", "org/shapes"] and d.metrics == ["accuracy", "mIoU"]
    assert sorted((r.task_name, r.metric_type, r.metric_value) for r in d.eval_results) == [
        ("cls_b", "accuracy", 0.75), ("seg_a", "mIoU", 0.6123)]
    text = card.text
    assert "| seg_a | seg | bg, crack | cnn (geometric, 0.70) | mIoU 0.6123 |" in text
    assert "| cls_b | cls | x, y, z | vit (semantic, 0.90) | accuracy 0.7500 |" in text
    assert "| vit | `timm:vit_small_patch16_224` | semantic | [0] | [16] | [16] | in model.safetensors |" in text
    assert "- levels (strides): [8, 16], widths [16, 16]" in text
    assert "| level | vit (semantic) | cnn (geometric) |" in text and "| stride 8 | 0.200 | 0.800 |" in text
    assert "| mean over levels | 0.900 | 0.100 |" in text and "![gate weights per task and level](gate_heatmap.png)" in text

    # without card data the card still has the metadata and the structure, and no empty sections
    model.save_pretrained(tmp_path / "plain")
    plain = ModelCard.load(tmp_path / "plain" / "README.md")
    assert plain.data.metrics is None and "## Gate" not in plain.text and "## Extractors" in plain.text
    with pytest.raises(ValueError, match=r"card_data: unknown key\(s\) \['metric'\]"):
        model.save_pretrained(tmp_path / "bad", card_data={"metric": {}})
    with pytest.raises(ValueError, match=r"card_data.gate.seg_a: unknown extractor\(s\) \['dino'\]"):
        model.save_pretrained(tmp_path / "bad", card_data={"gate": {"seg_a": {"dino": 1.0}}})


def test_save_pretrained_draws_the_gate_heatmap_next_to_the_card(tmp_path):
    from PIL import Image

    from backbone_router.router.card import card_gate_panels

    model = tiny_router()
    gate = {"seg_a": {8: {"vit": 0.2, "cnn": 0.8}, 16: {"vit": 0.4, "cnn": 0.6}}, "cls_b": {"16": {"vit": 0.9, "cnn": 0.1}}}
    model.save_pretrained(tmp_path / "m", card_data={"gate": gate})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md", "config.json", "gate_heatmap.png", "model.safetensors"]  # no temp files left behind
    with Image.open(tmp_path / "m" / "gate_heatmap.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100  # two level panels side by side
    assert "![gate weights per task and level](gate_heatmap.png)" in (tmp_path / "m" / "README.md").read_text()
    # what is drawn: one panel per level (JSON's string strides too), NaN where a task has no weight at a level
    (s8, m8), (s16, m16) = card_gate_panels(gate, ["seg_a", "cls_b"], ["vit", "cnn"])
    assert (s8, s16) == (8, 16) and m8[0].tolist() == [0.2, 0.8] and np.isnan(m8[1]).all()
    assert m16.tolist() == [[0.4, 0.6], [0.9, 0.1]]
    # a task with only the mean over levels: one panel of means
    [(level, mean)] = card_gate_panels({**gate, "cls_b": {"vit": 0.9, "cnn": 0.1}}, ["seg_a", "cls_b"], ["vit", "cnn"])
    assert level is None and np.allclose(mean, [[0.3, 0.7], [0.9, 0.1]])


# ---- extractors and text encoders in their libraries' own formats, from the cache --------------------------
def save_open_clip(directory: Path, mean=(0.1, 0.2, 0.3), **config_changes) -> torch.nn.Module:
    """A tiny random open_clip model written by open_clip's own save_for_hf (open_clip_config.json +
    open_clip_model.safetensors). Its OpenAI tokenizer has no files to save, as on the Hub."""
    from types import SimpleNamespace

    from open_clip.push_to_hf_hub import save_for_hf

    from backbone_router.extractors.open_clip_backend import import_open_clip

    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-p16", force_preprocess_cfg={"mean": mean}).eval()
    cfg = {**open_clip.get_model_config("tiny-vit-p16"), **config_changes}
    save_for_hf(model, SimpleNamespace(save_pretrained=lambda d: None), cfg, str(directory), safe_serialization=True)
    return model


def partial_cache_message(folder: Path, weights: str, spec_prefix: str, repo: str) -> str:
    """Cache `folder` without its `weights` file as `repo`; loading `spec_prefix + repo` must fail naming the repo's
    cache dir and the offline setting. Returns the error message."""
    from backbone_router.extractors import create_extractor

    (folder / weights).unlink()
    cache_snapshot(repo, folder)
    with pytest.raises(FileNotFoundError) as err:
        create_extractor(spec_prefix + repo)
    msg = str(err.value)
    assert str(repo_cache_dir(repo)) in msg and "HF_HUB_OFFLINE is set" in msg
    return msg


def test_open_clip_hf_hub_and_local_dir_specs_load_open_clips_own_format(tmp_path, new_repo_id):
    from backbone_router.extractors import create_extractor
    from backbone_router.extractors.open_clip_backend import OpenClipExtractor, import_open_clip

    model = save_open_clip(tmp_path / "clip")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    repo = new_repo_id("clip")
    cache_snapshot(repo, tmp_path / "clip")
    ref = OpenClipExtractor(model, None, "tiny-vit-p16")
    x = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        want = ref(x)
        for spec in (f"open_clip:local-dir:{tmp_path / 'clip'}", f"open_clip:hf-hub:{repo}"):
            ext = create_extractor(spec).eval()
            got = ext(x)
            assert torch.equal(got["pooled"], want["pooled"]) and torch.equal(got["dense"][0], want["dense"][0]), spec
            assert ext.info.mean == (0.1, 0.2, 0.3) and ext.info.name == spec
        # the text tower and its tokenizer come from the same cached config
        text = ext.text_encoder().encode(["a crack in concrete"])
        tokens = import_open_clip().get_tokenizer("tiny-vit-p16")(["a crack in concrete"])
        assert torch.equal(text, torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))


def test_open_clip_towers_it_cannot_serve_are_refused_before_any_weights_are_fetched(tmp_path, new_repo_id):
    from backbone_router.extractors import create_extractor

    save_open_clip(tmp_path / "timm_tower", vision_cfg={"image_size": 64, "timm_model_name": "vit_tiny_patch16_224"})
    (tmp_path / "timm_tower" / "open_clip_model.safetensors").unlink()  # nothing to fetch: only the config is read
    repo = new_repo_id("siglip")
    cache_snapshot(repo, tmp_path / "timm_tower")
    with pytest.raises(ValueError, match=r"image tower is a timm model \(vit_tiny_patch16_224\); only open_clip's Vis"):
        create_extractor(f"open_clip:hf-hub:{repo}")
    # named configs too: no webli weights are cached, yet the error is about the tower, not the weights
    with pytest.raises(ValueError, match=r"ViT-B-16-SigLIP/webli: the image tower is a timm model"):
        create_extractor("open_clip:ViT-B-16-SigLIP/webli")
    with pytest.raises(ValueError, match=r"RN50/openai: the image tower is a ModifiedResNet"):
        create_extractor("open_clip:RN50/openai")


def test_partial_caches_name_the_cache_dir_the_missing_file_and_offline(tmp_path, new_repo_id):
    import transformers as tf

    from backbone_router.extractors import create_extractor

    save_open_clip(tmp_path / "clip")
    msg = partial_cache_message(tmp_path / "clip", "open_clip_model.safetensors", "open_clip:hf-hub:", new_repo_id())
    assert "open_clip_model.safetensors" in msg

    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                          image_size=28, patch_size=14)
    torch.manual_seed(0)
    tf.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    full, partial = new_repo_id("dino"), new_repo_id("dino")
    cache_snapshot(full, tmp_path / "dino")
    (tmp_path / "dino" / "model.safetensors").unlink()
    snapshot = cache_snapshot(partial, tmp_path / "dino")
    with pytest.raises(FileNotFoundError) as err:
        create_extractor(f"hf:{partial}")
    msg = str(err.value)
    assert str(snapshot) in msg and "lacks model.safetensors" in msg and "HF_HUB_OFFLINE is set" in msg
    # the complete repo loads, every tensor from the cache
    ext = create_extractor(f"hf:{full}")
    ref = tf.Dinov2Model.from_pretrained(repo_cache_dir(full) / "snapshots" / (repo_cache_dir(full) / "refs" / "main").read_text())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ext.model.state_dict().items())


def tiny_bert_dir(d: Path) -> Path:
    """A tiny random BERT (64 positions) saved by transformers, with all-MiniLM-L6-v2's tokenizer files."""
    import transformers as tf

    from backbone_router.extractors.text import minilm_dir

    d.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, d / name)
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64)).save_pretrained(d)
    return d


def test_text_encoder_truncates_at_sentence_bert_max_seq_length(tmp_path, new_repo_id):
    import json

    from backbone_router.extractors.text import create_text_encoder

    d = tiny_bert_dir(tmp_path / "st")
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": False}))
    repo = new_repo_id("st")
    cache_snapshot(repo, d)
    a, b = "cracks in old concrete walls near windows", "cracks in old concrete floors after rain today"
    for spec in (f"hf:{d}", f"hf:{repo}"):
        enc = create_text_encoder(spec)
        assert enc.max_length == 6, spec
        va, vb = enc.encode([a, b])  # [CLS] + 4 word pieces + [SEP]: the same first four words, the same vector
        assert torch.equal(va, vb)
    (d / "sentence_bert_config.json").unlink()  # without it: the model's own limit (64 positions)
    enc = create_text_encoder(f"hf:{d}")
    va, vb = enc.encode([a, b])
    assert enc.max_length == 64 and not torch.allclose(va, vb)


def test_timm_local_dir_and_hf_hub_specs_load_timms_own_format(tmp_path, new_repo_id):
    import timm
    from timm.models import save_for_hf

    from backbone_router.extractors import create_extractor
    from backbone_router.extractors.local_dir import save_extractor_dir
    from backbone_router.extractors.timm_backend import TimmExtractor

    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()
    save_for_hf(model, str(tmp_path / "vit"), model_args=args, safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["config.json", "model.safetensors"]
    repo = new_repo_id("vit")
    cache_snapshot(repo, tmp_path / "vit")
    ref_model = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True, **args)
    ref_model.load_state_dict(model.state_dict())
    ref = TimmExtractor(ref_model.eval(), None)
    x = torch.rand(2, 3, 48, 80)  # not the saved 32 x 32: position embeddings are interpolated
    with torch.no_grad():
        want = ref(x)
        for spec in (f"timm:local-dir:{tmp_path / 'vit'}", f"timm:hf-hub:{repo}"):
            ext = create_extractor(spec).eval()
            got = ext(x)
            assert torch.equal(got["dense"][0], want["dense"][0]) and torch.equal(got["pooled"], want["pooled"]), spec
            assert ext.info.patch_size == 16 and ext.info.widths == (32,)

    # a cached repo without its weights, and this package's own older format under the timm name
    msg = partial_cache_message(tmp_path / "vit", "model.safetensors", "timm:hf-hub:", new_repo_id())
    assert "'model.safetensors', 'pytorch_model.bin'" in msg
    save_extractor_dir(ref, tmp_path / "old", "vit_small_patch16_224", args)
    with pytest.raises(ValueError, match=r"not a timm config.json with 'architecture'.*loads as 'local-dir:<dir>'"):
        create_extractor(f"timm:local-dir:{tmp_path / 'old'}")
    assert create_extractor(f"local-dir:{tmp_path / 'old'}").info.widths == (32,)  # old folders still load


# ---- extractors this package writes are in timm's format, and travel with a pushed Router ---------------------
def test_imgsim_converter_writes_timms_format_that_timm_and_create_extractor_open(tmp_path):
    import timm

    from backbone_router.extractors import create_extractor
    from backbone_router.train.imgsim_extractor import PREFIX, write_imgsim_extractor

    torch.manual_seed(0)  # a stand-in for imgsim's model.pth: a ResNet-50 under module.pre.* with a 2048 -> 768 head
    fake = {PREFIX + k: v for k, v in timm.create_model("resnet50", pretrained=False, num_classes=768).state_dict().items()}
    torch.save(fake, tmp_path / "model.pth")
    out = write_imgsim_extractor(tmp_path / "r50", weights=tmp_path / "model.pth")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    opened = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert opened.num_classes == 0 and opened.num_features == 2048
    trunk = {k[len(PREFIX):]: v for k, v in fake.items() if not k.startswith(PREFIX + "fc.")}
    assert opened.state_dict().keys() == trunk.keys() and all(torch.equal(v, trunk[k]) for k, v in opened.state_dict().items())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = (create_extractor(s).eval() for s in (f"timm:local-dir:{out}", f"local-dir:{out}"))
        assert torch.equal(a(x)["pooled"], b(x)["pooled"])
        assert torch.equal(a(x)["pooled"], opened.eval().forward_head(opened.forward_features(a.preprocess(x)), pre_logits=True))
    assert a.info.family == "morphological" and a.info.layers == (3, 4) and a.info.widths == (1024, 2048)
    assert a.info.mean == (0.485, 0.456, 0.406) and a.info.strides == (16, 32)


def test_push_to_hub_uploads_what_a_hub_user_can_rebuild_and_refuses_the_rest(tmp_path, recorded_hub, images):
    import transformers as tf

    from backbone_router.extractors import create_extractor
    from backbone_router.extractors.timm_backend import save_timm_extractor

    args = {"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}
    torch.manual_seed(0)
    save_timm_extractor(create_extractor("timm:vit_small_patch16_224", pretrained=False, family="morphological",
                                         **args), tmp_path / "ssl", args, {"method": "test"})
    vit = {"spec": f"timm:local-dir:{tmp_path / 'ssl'}", "name": "vit"}
    # fine-tuned (weights saved), or frozen with full=True: the folder's config.json travels in the Router's
    for extractor, full in (({**vit, "frozen": False}, False), (vit, True)):
        torch.manual_seed(0)
        model = Router(RouterConfig.from_dict({**TINY, "extractors": [extractor, TINY["extractors"][1]]})).eval()
        recorded_hub["copy"] = tmp_path / f"up_{full}"
        model.push_to_hub("org/x", full=full)
        assert recorded_hub["upload_folder"]["files"] == ["README.md", "config.json", "model.safetensors"]
        (tmp_path / "ssl").rename(tmp_path / "away")  # the Hub user has no such folder
        with torch.no_grad():
            back = Router.from_pretrained(tmp_path / f"up_{full}").eval()
            assert_same_outputs(back, model, images)
        assert back.extractors["vit"].info.family == "morphological"
        (tmp_path / "away").rename(tmp_path / "ssl")
    # frozen and not uploaded: refused before anything is created
    recorded_hub.clear()
    model = Router(RouterConfig.from_dict({**TINY, "extractors": [vit, TINY["extractors"][1]]}))
    with pytest.raises(ValueError, match=r"\['vit'\] take their weights from a local file or dir.*ssl.*full=True"):
        model.push_to_hub("org/x")
    assert recorded_hub == {}
    # an hf:<dir> model reads its config.json from the folder even for saved weights: refused even with full=True
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    dino = {"spec": f"hf:{tmp_path / 'dino'}", "name": "dino", "pretrained": False}
    model = Router(RouterConfig.from_dict({**TINY, "extractors": [dino, TINY["extractors"][1]]}))
    with pytest.raises(ValueError, match=r"\['dino'\] need \['its architecture, from the folder .*dino'\].*timm:local-dir"):
        model.push_to_hub("org/x", full=True)
    assert recorded_hub == {}


# ---- checkpoints as the Hub holds them, loaded by hub name from the cache (offline), every tensor from there --------
def cached_tensors(repo: str, filename: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The tensors of `filename` in the snapshot that the repo's refs/main points at."""
    from safetensors.torch import load_file

    root = repo_cache_dir(repo)
    return load_file(str(root / "snapshots" / (root / "refs" / "main").read_text() / filename))


def assert_from_cache(model: torch.nn.Module, cached: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every tensor of `model` (keys under `prefix` in `cached`) equals the cached file's, or those of the random
    model that was saved there: nothing is left at a fresh random init."""
    state = model.state_dict()
    assert state and all(torch.equal(v, cached[prefix + k]) for k, v in state.items()), sorted(set(state) - {
        k.removeprefix(prefix) for k in cached})[:4]


def test_a_full_clip_checkpoint_with_the_hubs_older_key_names_loads_from_the_cache(tmp_path, new_repo_id):
    import json

    import transformers as tf
    from safetensors.torch import load_file, save_file

    from backbone_router.extractors import create_extractor
    from backbone_router.extractors.hf_backend import OPENAI_CLIP
    from backbone_router.extractors.open_clip_backend import import_open_clip

    # transformers: a whole CLIPModel (text tower too) with the position_ids buffers that the Hub's openai/clip-vit-*
    # files still hold (newer transformers neither saves nor expects them)
    torch.manual_seed(0)
    clip = tf.CLIPModel(tf.CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2},
        vision_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": 32, "patch_size": 8}, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(OPENAI_CLIP[0]), "image_std": list(OPENAI_CLIP[1]), "crop_size": 32}))
    repo = new_repo_id("clip-vit")
    cache_snapshot(repo, tmp_path / "hf")
    ext = create_extractor(f"hf:{repo}", layers=[0, 1]).eval()
    assert_from_cache(ext.model, cached_tensors(repo), "vision_model.")  # CLIPVisionModel's keys lost that level
    assert ext.info.mean == OPENAI_CLIP[0] and ext.info.patch_size == 8
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        out = ext(x)
        want = clip.vision_model(pixel_values=ext.preprocess(x), interpolate_pos_encoding=True).pooler_output
    assert torch.allclose(out["pooled"], want, atol=1e-6) and out["dense"][1].shape == (2, 16, 4, 6)

    # open_clip: its older Hub file (open_clip_pytorch_model.bin, a pickle of tensors) in the plain CLIP text layout,
    # for a config whose text tower is a custom one: open_clip's loader converts the keys, and so must ours
    model = save_open_clip(tmp_path / "oc", custom_text=True)
    weights = tmp_path / "oc" / "open_clip_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "oc" / "open_clip_pytorch_model.bin")
    weights.unlink()
    repo = new_repo_id("clip-oc")
    cache_snapshot(repo, tmp_path / "oc")
    ext = create_extractor(f"open_clip:hf-hub:{repo}").eval()
    assert type(ext.clip_model).__name__ == "CustomTextCLIP"  # text keys converted to its text.* tower
    assert_from_cache(ext.clip_model, {f"text.{k}" if not k.startswith(("visual.", "logit_")) else k: v
                                       for k, v in model.state_dict().items()})
    text = ext.text_encoder().encode(["a crack in concrete"])
    tokens = import_open_clip().get_tokenizer("tiny-vit-p16")(["a crack in concrete"])
    assert torch.allclose(text, torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1), atol=1e-6)


def test_a_model_saved_by_sentence_transformers_loads_as_the_text_encoder_by_hub_name(tmp_path, new_repo_id):
    import json

    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 (the old `sentence_transformers.models` is deprecated there)
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    from backbone_router.extractors.text import create_text_encoder

    bert = tiny_bert_dir(tmp_path / "bert")
    st = SentenceTransformer(modules=[models.Transformer(str(bert), max_seq_length=6), models.Pooling(16, "mean"),
                                      models.Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))  # modules.json, 1_Pooling/, 2_Normalize/, the Transformer's files at the root
    repo = new_repo_id("minilm")
    cache_snapshot(repo, tmp_path / "st")
    enc = create_text_encoder(f"hf:{repo}")
    assert_from_cache(enc.model, cached_tensors(repo))
    texts = ["cracks in old concrete walls near windows", "cracks in old concrete floors after rain today", "a cat"]
    want = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_tensor=True)
    assert enc.max_length == 6 == st.max_seq_length  # where sentence-transformers truncates, wherever it saved it
    assert torch.allclose(enc.encode(texts), want.cpu(), atol=1e-6)

    pooling = tmp_path / "st" / "1_Pooling" / "config.json"  # another pooling would give other vectors: refused
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "cls"}))
    repo = new_repo_id("minilm")
    cache_snapshot(repo, tmp_path / "st")
    with pytest.raises(ValueError, match=r"1_Pooling/config.json pools by \['cls'\]; .* mean of the token embeddings"):
        create_text_encoder(f"hf:{repo}")


def test_dinov2_with_registers_and_siglip_load_under_hf_from_the_cache(tmp_path, new_repo_id):
    import transformers as tf

    from backbone_router.extractors import create_extractor

    tower = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
             "image_size": 28, "patch_size": 14}
    torch.manual_seed(0)
    dino = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, **tower)).eval()
    siglip = tf.SiglipModel(tf.SiglipConfig(  # the whole model, as google/siglip-* repos hold it
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 28})).eval()
    x = torch.rand(2, 3, 28, 42)
    for name, model, tokens in (("dinov2-reg", dino, 5), ("siglip", siglip, 0)):
        model.save_pretrained(tmp_path / name)
        repo = new_repo_id(name)
        cache_snapshot(repo, tmp_path / name)
        ext = create_extractor(f"hf:{repo}", layers=[0, 1]).eval()
        prefix = "vision_model." if name == "siglip" else ""
        # transformers renames these keys between file and module: compare with the saved module's own tensors
        assert_from_cache(ext.model, (model.vision_model if prefix else model).state_dict())
        with torch.no_grad():
            out = ext(x)
            ref = (model.vision_model(pixel_values=ext.preprocess(x), interpolate_pos_encoding=True) if prefix
                   else model(pixel_values=ext.preprocess(x)))
        # the last map is the final hidden state without CLS and registers (SigLIP has neither), 2 x 3 patches
        want = ref.last_hidden_state[:, tokens:].transpose(1, 2).reshape(2, 16, 2, 3)
        assert out["dense"][0].shape == (2, 16, 2, 3) and torch.allclose(out["dense"][1], want, atol=1e-6), name
        assert torch.allclose(out["pooled"], ref.pooler_output, atol=1e-6), name
