"""The extractor contract on tiny random extractors of every backend, through `create_extractor`."""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import save_file

from backbone_router.extractors import create_extractor
from backbone_router.extractors.text import create_text_encoder

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}
TINY_HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}


def save_tiny_hf(directory, model_type: str, **extra):
    """A tiny random transformers vision model (testers' sizes: hidden 32, 2 layers, image 30) saved to a dir."""
    import transformers

    classes = {
        "dinov2": ("Dinov2Config", "Dinov2Model", {"patch_size": 2}),
        "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {"patch_size": 2, "num_register_tokens": 2}),
        "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel", {"patch_size": 2, "projection_dim": 16}),
        "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel", {"patch_size": 2}),
        "vit": ("ViTConfig", "ViTModel", {"patch_size": 2}),
    }
    config_name, model_name, defaults = classes[model_type]
    config = getattr(transformers, config_name)(**TINY_HF, image_size=30, **{**defaults, **extra})
    kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
    model = getattr(transformers, model_name)(config, **kwargs).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_dinov2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_dinov2")
    save_tiny_hf(directory, "dinov2")
    return directory


BUILDERS = {
    "timm-vit14": lambda d, **kw: create_extractor("timm:vit_small_patch14_dinov2", pretrained=False, **TINY_VIT, **kw),
    "timm-resnet18": lambda d, **kw: create_extractor("timm:resnet18", pretrained=False, **kw),
    "open_clip-p16": lambda d, **kw: create_extractor("open_clip:tiny-vit-p16", pretrained=False, **kw),
    "hf-dinov2": lambda d, **kw: create_extractor(f"hf:{d}", **kw),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def extractor(request, hf_dinov2_dir):
    torch.manual_seed(0)
    return BUILDERS[request.param](hf_dinov2_dir).eval()


def test_contract_on_odd_sizes_colour_and_greyscale(extractor):
    torch.manual_seed(1)
    grey = torch.rand(2, 1, 97, 130)
    with torch.no_grad():
        out1 = extractor(grey)
        out3 = extractor(grey.repeat(1, 3, 1, 1))
        other = extractor(torch.rand(2, 3, 97, 130))
    info = extractor.info
    assert len(out1["dense"]) == len(info.layers) == len(info.widths)
    for d, width, stride in zip(out3["dense"], info.widths, info.strides):
        assert d.shape == (2, width, math.ceil(97 / stride), math.ceil(130 / stride))
        assert torch.isfinite(d).all()
    assert out3["pooled"].shape == (2, info.width)
    # Greyscale is the colour image with the channel repeated: the same numbers, not only the same shapes.
    for a, b in zip(out1["dense"], out3["dense"]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out1["pooled"], out3["pooled"])
    # The features depend on the image (random tiny ViTs barely move their CLS vector: only "not equal").
    assert not torch.equal(other["pooled"], out3["pooled"])
    assert (other["dense"][-1] - out3["dense"][-1]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "images, error, words",
    [
        (torch.rand(1, 2, 32, 32), ValueError, "C = 1"),
        (torch.randint(0, 255, (1, 3, 32, 32)), TypeError, "torch.int64"),
        (torch.rand(3, 32, 32), ValueError, "(B, C, H, W)"),
    ],
    ids=["two-channels", "int-dtype", "3-d"],
)
def test_bad_images_are_clear_errors(extractor, images, error, words):
    with pytest.raises(error, match=None) as exc:
        extractor(images)
    assert words in str(exc.value) and extractor.info.name in str(exc.value)


@pytest.mark.parametrize(
    "name", ["timm-vit14", "open_clip-p16", "hf-dinov2"]
)
def test_layers_int_means_last_n_and_list_means_indices(name, hf_dinov2_dir):
    kw = {"init_values": 1.0} if name == "timm-vit14" else {}  # DINOv2's 1e-5 layer scale makes blocks look alike
    torch.manual_seed(0)
    last_two = BUILDERS[name](hf_dinov2_dir, layers=2, **kw).eval()
    torch.manual_seed(0)
    picked = BUILDERS[name](hf_dinov2_dir, layers=[-1, 0], **kw).eval()
    assert last_two.info.layers == (0, 1) and picked.info.layers == (1, 0)
    x = torch.rand(1, 3, 40, 50)
    with torch.no_grad():
        a, b = last_two(x), picked(x)
    torch.testing.assert_close(a["dense"][1], b["dense"][0])
    torch.testing.assert_close(a["dense"][0], b["dense"][1])
    assert (a["dense"][0] - a["dense"][1]).abs().max() > 1e-3  # two blocks, two different maps
    with pytest.raises(ValueError, match="layers=3"):
        BUILDERS[name](hf_dinov2_dir, layers=3, **kw)


def test_unknown_backend_and_names_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        create_extractor("nope:model")
    with pytest.raises(ValueError, match="cannot place spec"):
        create_extractor("no-prefix-model")
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        create_extractor("open_clip:ViT-Q-99", pretrained=False)
    with pytest.raises(ValueError, match="unknown pretrained tag 'no_such_tag'.*laion2b_s34b_b79k"):
        create_extractor("open_clip:ViT-B-32/no_such_tag")
    with pytest.raises(ValueError, match="pretrained=True needs weights"):
        create_extractor("open_clip:tiny-vit-p16")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_extractor(f"hf:{tmp_path / 'missing'}")
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        create_extractor(f"hf:{tmp_path}", pretrained=False)


def test_freeze_stops_every_gradient(extractor):
    extractor.freeze().train()
    out = extractor(torch.rand(1, 3, 33, 47))
    assert not out["pooled"].requires_grad and not any(d.requires_grad for d in out["dense"])
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.unfreeze().eval()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_unfreeze_last_trains_only_the_last_block_and_final_norm(name, hf_dinov2_dir):
    ext = BUILDERS[name](hf_dinov2_dir, layers=[-1]).unfreeze_last(1).train()
    out = ext(torch.rand(2, 3, 45, 61))
    (out["dense"][-1].square().mean() + out["pooled"].square().mean()).backward()
    expected = {id(p) for m in [ext.block_modules()[-1], *ext.final_modules()] for p in m.parameters()}
    if name == "open_clip-p16":
        expected.add(id(ext.visual.proj))  # the projection to the pooled vector trains with the last block
    got = {id(p) for p in ext.parameters() if p.grad is not None}
    names = {id(p): n for n, p in ext.named_parameters()}
    assert got == expected, f"unexpected {[names[i] for i in got - expected]}, missing {[names[i] for i in expected - got]}"
    assert sum(p.grad.abs().sum() for p in ext.block_modules()[-1].parameters()) > 0


def test_frozen_batch_norm_keeps_its_statistics_in_train_mode():
    ext = create_extractor("timm:resnet18", pretrained=False).unfreeze_last(1).train()
    frozen_bn, trained_bn = ext.model.layer1[0].bn1, ext.model.layer4[0].bn1
    before_frozen, before_trained = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    ext(torch.rand(2, 3, 64, 64))
    assert not frozen_bn.training and trained_bn.training
    torch.testing.assert_close(frozen_bn.running_mean, before_frozen, rtol=0, atol=0)
    assert (trained_bn.running_mean - before_trained).abs().max() > 0


def test_open_clip_matches_open_clip_forward_and_resamples_position_embeddings():
    import open_clip
    from open_clip.model import resize_pos_embed

    ext = create_extractor("open_clip:tiny-vit-p16", pretrained=False, layers=[0, 1]).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = ext(x)
        ref = ext.visual.forward_intermediates(ext.preprocess(x), indices=[0, 1], normalize_intermediates=True)
    torch.testing.assert_close(out["pooled"], ref["image_features"])
    for a, b in zip(out["dense"], ref["image_intermediates"]):
        torch.testing.assert_close(a, b)
    # Off the native grid: equal to open_clip built for that size with its own position-embedding resize.
    big = open_clip.create_model("tiny-vit-p16", force_image_size=(96, 128)).eval()
    sd = ext.clip_model.state_dict()
    resize_pos_embed(sd, big)
    big.load_state_dict(sd)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(ext(x)["pooled"], big.encode_image(ext.preprocess(x)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type, prefix", [("dinov2_with_registers", 3), ("clip_vision_model", 1),
                                                ("siglip_vision_model", 0), ("vit", 1)])
def test_hf_model_types_drop_prefix_tokens_and_norm_the_last_map(tmp_path, model_type, prefix):
    model = save_tiny_hf(tmp_path, model_type)
    ext = create_extractor(f"hf:{tmp_path}", layers=[0, 1]).eval()
    x = torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        out = ext(x)
        ref = model(pixel_values=ext.preprocess(x), output_hidden_states=True)
    inner = getattr(model, "vision_model", model)
    norm = getattr(inner, "layernorm", None) or inner.post_layernorm
    expected_last = norm(ref.hidden_states[2])[:, prefix:].transpose(1, 2).reshape(2, 32, 15, 15)
    expected_first = ref.hidden_states[1][:, prefix:].transpose(1, 2).reshape(2, 32, 15, 15)
    torch.testing.assert_close(out["dense"][1], expected_last)
    torch.testing.assert_close(out["dense"][0], expected_first)
    if model_type != "clip_vision_model":  # CLIP's last_hidden_state is before post_layernorm
        torch.testing.assert_close(out["dense"][1], ref.last_hidden_state[:, prefix:].transpose(1, 2).reshape(2, 32, 15, 15))
    pooled = ref.pooler_output if ref.pooler_output is not None else ref.last_hidden_state[:, 0]
    torch.testing.assert_close(out["pooled"], pooled)
    odd = ext(torch.rand(1, 1, 97, 130))  # interpolated position embeddings at any size
    assert odd["dense"][1].shape == (1, 32, 49, 65) and torch.isfinite(odd["pooled"]).all()


def test_hf_mean_std_come_from_the_preprocessor_config(tmp_path):
    import json

    save_tiny_hf(tmp_path, "dinov2")
    assert create_extractor(f"hf:{tmp_path}").info.mean == (0.485, 0.456, 0.406)  # the model type's default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    info = create_extractor(f"hf:{tmp_path}").info
    assert info.mean == (0.1, 0.2, 0.3) and info.std == (1, 2, 3)


def test_hf_missing_weights_are_an_error_not_a_random_init(tmp_path):
    from safetensors.torch import load_file

    save_tiny_hf(tmp_path, "dinov2")
    sd = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in sd if "layer.1." in k)
    save_file({k: v for k, v in sd.items() if k != dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys"):
        create_extractor(f"hf:{tmp_path}")


@pytest.mark.parametrize(
    "spec, kwargs, words",
    [
        ("timm:resnet18", {}, ["timm/resnet18.a1_in1k", "HF_HUB_OFFLINE"]),
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", {}, ["laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "HF_HUB_OFFLINE"]),
        ("hf:facebook/dinov2-small", {}, ["models--facebook--dinov2-small", "HF_HUB_OFFLINE"]),
    ],
)
def test_pretrained_without_weights_offline_fails_fast_saying_where_it_looked(spec, kwargs, words):
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    assert HF_HUB_OFFLINE, "conftest must set HF_HUB_OFFLINE before huggingface_hub is imported"
    start = time.perf_counter()
    with pytest.raises((RuntimeError, FileNotFoundError)) as exc:
        create_extractor(spec, pretrained=True, **kwargs)
    assert time.perf_counter() - start < 20, "an offline miss must not wait on the network"
    message = str(exc.value)
    assert HF_HUB_CACHE in message
    for word in words:
        assert word in message, message


# ---- text encoders -----------------------------------------------------------------------------


def test_open_clip_text_tower_embeds_texts_like_encode_text():
    ext = create_extractor("open_clip:tiny-vit-p16", pretrained=False)
    enc = ext.text_encoder()
    texts = ["segment cracks in concrete", "classify flower species", "segment cracks in concrete"]
    v = enc.encode(texts)
    assert v.shape == (3, 32) and enc.dim == 32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v[0], v[2])
    assert (v[0] - v[1]).abs().max() > 1e-4
    import open_clip

    ref = ext.clip_model.encode_text(open_clip.get_tokenizer("tiny-vit-p16")(texts))
    torch.testing.assert_close(v, torch.nn.functional.normalize(ref, dim=-1))
    assert not any(p.requires_grad for p in enc.parameters())
    assert create_text_encoder("open_clip:tiny-vit-p16", pretrained=False).encode(["x"]).shape == (1, 32)


def test_hf_text_encoder_mean_pools_under_the_attention_mask(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "segment", "cracks", "in", "concrete", "flowers"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(tmp_path)
    enc = create_text_encoder(f"hf:{tmp_path}")
    alone = enc.encode(["flowers"])
    batch = enc.encode(["flowers", "segment cracks in concrete concrete"])  # "flowers" is padded here
    assert batch.shape == (2, 32) and enc.dim == 32
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)  # padding does not change a text's vector
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(2))
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("flowers")
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(ValueError, match="unknown backend 'bert'"):
        create_text_encoder("bert:x")


def test_cnn_layers_out_of_order_pair_maps_with_their_widths_and_strides():
    ext = create_extractor("timm:resnet18", pretrained=False, layers=[4, 2])
    out = ext(torch.rand(1, 3, 97, 130))
    assert ext.info.widths == (512, 128) and ext.info.strides == (32, 8)
    assert [tuple(d.shape[1:]) for d in out["dense"]] == [(512, 4, 5), (128, 13, 17)]
