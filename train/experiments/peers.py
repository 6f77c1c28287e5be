"""Peer rows of the comparison: what a user would pick instead of the Router.

A ``segmentation_models_pytorch.Unet`` with its ``mobilenet_v2`` encoder, which is torchvision's
MobileNetV2, so the shared ImageNet file (torchvision layout) loads into ``model.encoder`` strictly once the
classifier is dropped. Two peers, one U-Net per segmentation task (a user trains one per dataset):

- ``peer_unet_frozen``: the encoder frozen (no gradients, BatchNorm in eval mode); decoder and head train;
- ``peer_unet_finetuned``: the whole U-Net trains, the encoder at ``train.phase2_lr_scale`` x lr like an
  unfrozen extractor of a routed variant (:func:`train.compare.make_optimizer`).

A peer is not a Router: it runs its own encoder on the images of the comparison's precomputed views (the
same crops, flips and jitter as every other variant) instead of reading the frozen-feature cache, and it
has no gate. Classification tasks are not served (the peer has no rows for them). Images in [0, 1] with 1
channel are repeated to 3, normalized with the ImageNet mean/std, and padded to a multiple of 32 (zero after
normalization, as the extractors pad); the logits are cropped back to the input size.

The U-Nets run in channels_last (weights and activations; the logits come back contiguous): on the CPU a peer's
training step at batch 16, 160 px, one thread (an Intel Xeon) takes 1.3 instead of 1.7-1.8 s (frozen) and 1.6 instead
of 2.1-2.2 s (fine-tuned; on an AMD EPYC the gain inside the comparison was 5-7 %); the same function up to float
rounding (channels_last's BatchNorm rounds a few times coarser; tests/test_peers.py), and the same results at the
comparison's full budget (docs/performance.md).

Needs the optional extra ``pip install -e ".[peers]"`` (segmentation-models-pytorch).

>>> peer = build_peer("peer_unet_frozen", {"cracks": 2}, "../shared/weights/mobilenet_v2-b0353104.pth")
>>> peer(torch.rand(2, 1, 97, 130), task="cracks")["seg"].shape
torch.Size([2, 2, 97, 130])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backbone_router.extractors import check_images
from backbone_router.extractors.io.weights import load_state_dict_file
from backbone_router.heads.seg import prior_logits

# peer variant name -> whether its encoder trains
PEER_VARIANTS = {"peer_unet_frozen": False, "peer_unet_finetuned": True}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, as the weights expect
ENCODER = "mobilenet_v2"
OUTPUT_STRIDE = 32  # smp's Unet needs inputs divisible by the encoder's total stride


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError(
            f"peer variants {sorted(PEER_VARIANTS)} need segmentation-models-pytorch: pip install -e \".[peers]\""
        ) from e
    return smp


def encoder_state(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """The MobileNetV2 state dict of a torchvision-layout file without its classifier (``classifier.*``)."""
    if path is None:
        raise ValueError(
            f"compare.peer_checkpoint: the peer variants ({', '.join(PEER_VARIANTS)}) need the ImageNet MobileNetV2 "
            "weights in torchvision's layout, e.g. ../shared/weights/mobilenet_v2-b0353104.pth"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"compare.peer_checkpoint: {path} is not a file; expected torchvision's ImageNet MobileNetV2 weights "
            "(mobilenet_v2-b0353104.pth, in ../shared/weights or $BACKBONE_ROUTER_WEIGHTS)"
        )
    if path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise ValueError(f"compare.peer_checkpoint: {path}: expected a .pth/.pt/.bin or .safetensors weights file")
    try:  # the package's safe reader: safetensors, or torch.load(weights_only=True); a pickle or truncation names the file
        state = load_state_dict_file(path)
    except ValueError as e:
        raise ValueError(f"compare.peer_checkpoint: {e}") from e
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def load_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], where: str = "encoder") -> None:
    """Load `state` into an smp MobileNetV2 encoder strictly; an error lists missing and unexpected keys."""
    own = set(encoder.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not match smp's {ENCODER} encoder (torchvision MobileNetV2 layout): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    nn.Module.load_state_dict(encoder, dict(state), strict=True)  # smp's override would pop from our dict


class UnetPeer(nn.Module):
    """One smp U-Net (mobilenet_v2 encoder) per segmentation task, called like a Router on one task."""

    def __init__(self, seg_tasks: dict[str, int], state: dict[str, torch.Tensor] | None, train_encoder: bool):
        super().__init__()
        if not seg_tasks:
            raise ValueError("UnetPeer: no segmentation task to serve")
        smp = _smp()
        self.train_encoder = train_encoder
        self.unets = nn.ModuleDict()
        for task, k in seg_tasks.items():
            unet = smp.Unet(encoder_name=ENCODER, encoder_weights=None, in_channels=3, classes=k)
            if state is not None:
                load_encoder(unet.encoder, state, where=f"UnetPeer[{task}].encoder")
            unet.encoder.requires_grad_(train_encoder)
            self.unets[task] = unet.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train()

    def serves(self, task: str) -> bool:
        return task in self.unets

    @staticmethod
    def is_pretrained(name: str) -> bool:
        """Whether a parameter name belongs to an encoder (trained at phase2_lr_scale x lr when it trains)."""
        return ".encoder." in f".{name}"

    def train(self, mode: bool = True) -> UnetPeer:
        super().train(mode)
        if not self.train_encoder:  # a frozen encoder keeps its BatchNorm statistics
            for unet in self.unets.values():
                unet.encoder.eval()
        return self

    @torch.no_grad()
    def init_bias_from_prior(self, task: str, prior: float) -> None:
        """Output bias from the foreground prior, as :meth:`heads.SegHead.init_bias_from_prior`."""
        conv = self.unets[task].segmentation_head[0]
        conv.bias.copy_(prior_logits(prior, conv.out_channels, where=f"UnetPeer.init_bias_from_prior({task!r})"))

    def forward(self, images: torch.Tensor, task: str, features=None) -> dict[str, torch.Tensor]:
        """`images` B x C x H x W in [0, 1] (C = 1 or 3) -> {"seg": B x K x H x W logits, "aux_loss": 0}.

        `features` (the Router's precomputed extractor outputs) is accepted and ignored.
        """
        if task not in self.unets:
            raise KeyError(f"UnetPeer: task {task!r} is not a segmentation task it serves; it serves {list(self.unets)}")
        x = check_images(images, "UnetPeer input")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % OUTPUT_STRIDE, 0, (-h) % OUTPUT_STRIDE)).contiguous(memory_format=torch.channels_last)
        logits = self.unets[task](x)[..., :h, :w].contiguous()
        return {"seg": logits, "aux_loss": logits.new_zeros(())}


def build_peer(name: str, seg_tasks: dict[str, int], checkpoint: str | os.PathLike | None,
               state: dict[str, torch.Tensor] | None = None, priors: dict[str, float] | None = None) -> UnetPeer:
    """The peer variant `name` for `seg_tasks` (task -> classes) with the encoder weights of `checkpoint`.

    `state` (from :func:`encoder_state`) spares reading the file again for every seed; `priors` (binary seg
    task -> foreground fraction) set the output biases as the Router's seg head gets them.
    """
    if name not in PEER_VARIANTS:
        raise ValueError(f"unknown peer variant {name!r}; expected one of {sorted(PEER_VARIANTS)}")
    peer = UnetPeer(seg_tasks, encoder_state(checkpoint) if state is None else state, train_encoder=PEER_VARIANTS[name])
    for task, p in (priors or {}).items():
        if peer.serves(task):
            peer.init_bias_from_prior(task, p)
    return peer
