"""Write the self-supervised ResNet-50 of the PyPI package ``imgsim`` (AugNet) as a ``local-dir:`` extractor.

``imgsim/model.pth`` holds a torchvision ResNet-50 under ``module.pre.*`` plus an extra 2048->768 head
(``module.pre.fc.*``). Dropping the head and the prefix gives exactly timm ``resnet50(num_classes=0)``'s
keys and shapes; it is loaded strictly and saved in timm's own format (``save_timm_extractor``), which
``timm.create_model("local-dir:runs/imgsim_resnet50")`` opens too:

    python train/imgsim_extractor.py runs/imgsim_resnet50      # then spec "local-dir:runs/imgsim_resnet50"

>>> ext = create_extractor(f"local-dir:{write_imgsim_extractor('runs/imgsim_resnet50')}")
>>> ext.info.family, ext.info.widths
('morphological', (1024, 2048))
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm

from backbone_router.extractors.io.weights import load_state_dict_file, load_state_dict_strict
from backbone_router.extractors.timm_backend import TimmExtractor, save_timm_extractor

PREFIX = "module.pre."
HEAD = ("fc.weight", "fc.bias")  # the 2048 -> 768 embedding head imgsim adds (tanh after it)


def imgsim_weights() -> Path:
    """Path of imgsim/model.pth in the installed package (``pip install imgsim``)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("imgsim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("imgsim is not installed: pip install imgsim (its wheel holds imgsim/model.pth)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed imgsim package")
    return path


def write_imgsim_extractor(directory: str | Path, weights: str | Path | None = None, layers=(3, 4),
                           family: str = "morphological") -> Path:
    """Convert imgsim's ResNet-50 (strict load into timm resnet50, head dropped) and save it in timm's format."""
    source = Path(weights) if weights is not None else imgsim_weights()
    sd = load_state_dict_file(source)
    foreign = [k for k in sd if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"{source}: keys without the {PREFIX!r} prefix {foreign[:4]}; not imgsim's model.pth")
    sd = {k[len(PREFIX):]: v for k, v in sd.items() if k[len(PREFIX):] not in HEAD}
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    load_state_dict_strict(model, sd, f"{source} (imgsim, head {HEAD} dropped)")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    ext = TimmExtractor(model, tuple(layers)).set_family(family)
    return save_timm_extractor(ext, directory, {"num_classes": 0},
                              source={"method": "AugNet self-supervised (PyPI imgsim 0.1.2)", "file": str(source)})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python train/imgsim_extractor.py OUTPUT_DIR")
    print(write_imgsim_extractor(sys.argv[1]))
