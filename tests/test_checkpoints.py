"""Weight files of the exact architectures, written here in their official layouts, loaded the real way.

Values must match the file (or the in-memory model that wrote it); unsafe or broken files are refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbone_router.extractors import create_extractor
from backbone_router.extractors.io.weights import load_state_dict_file
from backbone_router.extractors.local_dir import save_extractor_dir


def official_dinov2_vits14_state_dict() -> dict[str, torch.Tensor]:
    """The key layout and shapes of facebookresearch/dinov2's dinov2_vits14_pretrain.pth (random values)."""
    dim, depth, hidden, patch, grid = 384, 12, 1536, 14, 518 // 14
    sd = {
        "cls_token": torch.randn(1, 1, dim),
        "pos_embed": torch.randn(1, 1 + grid * grid, dim),  # 1 + 37 * 37 tokens: trained at 518 px
        "mask_token": torch.randn(1, dim),  # used by the iBOT loss only; timm drops it
        "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch) * 0.02,
        "patch_embed.proj.bias": torch.randn(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": torch.randn(dim), b + "norm1.bias": torch.randn(dim),
            b + "attn.qkv.weight": torch.randn(3 * dim, dim) * 0.02, b + "attn.qkv.bias": torch.randn(3 * dim),
            b + "attn.proj.weight": torch.randn(dim, dim) * 0.02, b + "attn.proj.bias": torch.randn(dim),
            b + "ls1.gamma": torch.randn(dim),
            b + "norm2.weight": torch.randn(dim), b + "norm2.bias": torch.randn(dim),
            b + "mlp.fc1.weight": torch.randn(hidden, dim) * 0.02, b + "mlp.fc1.bias": torch.randn(hidden),
            b + "mlp.fc2.weight": torch.randn(dim, hidden) * 0.02, b + "mlp.fc2.bias": torch.randn(dim),
            b + "ls2.gamma": torch.randn(dim),
        })
    sd.update({"norm.weight": torch.randn(dim), "norm.bias": torch.randn(dim)})
    return sd


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    sd = official_dinov2_vits14_state_dict()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return sd, path


def test_official_dinov2_vits14_file_loads_into_timm_with_every_value(dinov2_file):
    sd, path = dinov2_file
    ext = create_extractor("timm:vit_small_patch14_dinov2", checkpoint=str(path))
    own = ext.model.state_dict()
    assert set(own) == set(sd) - {"mask_token"}
    for key, value in own.items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=key)
    assert ext.info.patch_size == 14 and ext.info.widths == (384,)
    out = ext(torch.rand(1, 3, 70, 84))
    assert out["dense"][0].shape == (1, 384, 5, 6) and torch.isfinite(out["pooled"]).all()


def test_official_dinov2_file_of_another_size_is_refused_naming_the_file(tmp_path, dinov2_file):
    sd = {**dinov2_file[0], "blocks.3.mlp.fc1.weight": torch.randn(1000, 384)}
    path = tmp_path / "wrong.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"wrong\.pth.*blocks\.3\.mlp\.fc1\.weight"):
        create_extractor("timm:vit_small_patch14_dinov2", checkpoint=str(path))


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory):
    """A random open_clip ViT-B-32 saved as a state dict, and the model that wrote it (~150 M parameters)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    path = tmp_path_factory.mktemp("vit_b32") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_vit_b32_file_gives_the_features_of_the_model_that_wrote_it(vit_b32_file):
    model, path = vit_b32_file
    ext = create_extractor("open_clip:ViT-B-32", checkpoint=str(path), layers=[5, -1])
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = ext(x)
        ref = model.visual.forward_intermediates(ext.preprocess(x), indices=[5, 11], normalize_intermediates=True)
    torch.testing.assert_close(out["pooled"], ref["image_features"])  # = model.encode_image, unnormalized
    for a, b in zip(out["dense"], ref["image_intermediates"]):
        torch.testing.assert_close(a, b)
    loaded = ext.clip_model.state_dict()
    for name, value in model.state_dict().items():  # the text tower came from the same file
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    assert ext.info.mean == (0.48145466, 0.4578275, 0.40821073) and ext.info.patch_size == 32
    assert ext.info.widths == (768, 768) and ext.info.width == 512


def test_open_clip_training_checkpoint_safetensors_and_strict_keys(tmp_path):
    import open_clip

    model = open_clip.create_model("tiny-vit-p16").eval()
    sd = model.state_dict()
    x = torch.rand(1, 3, 64, 64)
    # An open_clip training checkpoint: {"epoch", "name", "state_dict": {"module.<key>": ...}} from DDP.
    train_ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, train_ckpt)
    safe = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, safe)
    # Three ways to name the file: checkpoint=, and in the spec after the first "/" (absolute path: "//").
    for spec, path in (("open_clip:tiny-vit-p16", train_ckpt), ("open_clip:tiny-vit-p16", safe),
                       (f"open_clip:tiny-vit-p16/{safe}", None)):
        ext = create_extractor(spec, checkpoint=None if path is None else str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(ext(x)["pooled"], model.encode_image(ext.preprocess(x)))
    partial = tmp_path / "partial.bin"
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_post.weight"}, partial)
    with pytest.raises(ValueError, match=r"partial\.bin.*missing keys \['visual\.ln_post\.weight'\]"):
        create_extractor("open_clip:tiny-vit-p16", checkpoint=str(partial))
    with pytest.raises(ValueError, match="give one"):
        create_extractor(f"open_clip:tiny-vit-p16/{safe}", checkpoint=str(safe))


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision", "clip_full"])
def test_transformers_dir_gives_the_outputs_of_the_model_that_wrote_it(tmp_path, kind):
    import transformers as tf

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
            "image_size": 30, "patch_size": 2}
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**tiny))
    elif kind == "clip_vision":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**tiny))
    else:
        text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 99}
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=tiny, projection_dim=16))
    model.eval().save_pretrained(tmp_path)
    vision = model.vision_model if kind == "clip_full" else model
    ext = create_extractor(f"hf:{tmp_path}", layers=[0, 1]).eval()
    x = torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        out = ext(x)
        ref = vision(pixel_values=ext.preprocess(x), output_hidden_states=True)
    torch.testing.assert_close(out["pooled"], ref.pooler_output)
    first = ref.hidden_states[1][:, 1:].transpose(1, 2).reshape(2, 32, 15, 15)
    torch.testing.assert_close(out["dense"][0], first)
    if kind == "dinov2":
        torch.testing.assert_close(out["dense"][1], ref.last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 32, 15, 15))
    reference = vision.state_dict()
    for name, p in ext.model.state_dict().items():  # every weight came from the directory
        torch.testing.assert_close(p, reference[name], rtol=0, atol=0, msg=name)


def test_local_dir_round_trip_gives_equal_features(tmp_path):
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}
    ext = create_extractor("timm:vit_small_patch14_dinov2", pretrained=False, layers=2, family="geometric", **kwargs).eval()
    save_extractor_dir(ext, tmp_path / "final", "vit_small_patch14_dinov2", kwargs, source={"method": "test"})
    back = create_extractor(f"local-dir:{tmp_path / 'final'}").eval()
    x = torch.rand(2, 1, 41, 57)
    with torch.no_grad():
        a, b = ext(x), back(x)
    torch.testing.assert_close(a["pooled"], b["pooled"], rtol=0, atol=0)
    for p, q in zip(a["dense"], b["dense"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert back.info.layers == (0, 1) and back.info.family == "geometric" and back.info.mean == ext.info.mean


class _WritesMarker:
    """Unpickling this would create a file: the code-execution attack on pickled checkpoints."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("spec", ["timm:resnet18", "open_clip:tiny-vit-p16", None])
def test_pickle_with_code_is_refused_and_the_code_never_runs(tmp_path, spec):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _WritesMarker(marker)}, f, protocol=2)  # a .pth, as torch.save would write it
    torch.save({"conv1.weight": _WritesMarker(marker)}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(ValueError, match=rf"{p.name}: refused or unreadable with torch.load\(weights_only=True\)"):
            if spec is None:
                load_state_dict_file(p)
            else:
                create_extractor(spec, checkpoint=str(p))
    assert not marker.exists(), "the pickled code ran"


def test_unsupported_suffixes_and_truncated_safetensors_are_clear_errors(tmp_path):
    sd = {"w": torch.randn(64, 64)}
    for suffix in (".txt", ".pkl"):
        path = tmp_path / f"weights{suffix}"
        torch.save(sd, path)
        with pytest.raises(ValueError, match=rf"weights\{suffix}: unsupported weight file type"):
            create_extractor("open_clip:tiny-vit-p16", checkpoint=str(path))
    full = tmp_path / "full.safetensors"
    save_file(sd, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        create_extractor("timm:resnet18", checkpoint=str(cut))
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        create_extractor("open_clip:tiny-vit-p16", checkpoint=str(tmp_path / "nowhere.pth"))
