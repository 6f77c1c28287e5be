"""The gate chooses by task: a two-task case where each task can be solved only from one extractor's maps.

Two fixed extractors see one input channel each: ``geo`` the channel that holds thin bars (task ``bars``),
``blob`` the channel that holds discs (task ``discs``). Every channel is noisy, so a map of the wrong channel
carries nothing about the task. After a short CPU training each task's gate must give its own extractor >= 0.8
of the weight, averaged over levels and images. The shipped gate does not yet (docs/gate.md): the test is an
expected failure, strict, so that it turns into an error the day a design passes it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from extractors.base import Extractor, ExtractorInfo
from extractors.registry import BUILDERS, register_extractor
from heads.losses import build_loss, output_loss
from router import Router, RouterConfig
from router.config import GateConfig, TaskConfig
from router.gate import ProbeMixture


class ChannelView(Extractor):
    """One input channel through fixed random 3 x 3 filters (ReLU), averaged to strides 4 and 8."""

    def __init__(self, channel: int, width: int = 8):
        super().__init__(ExtractorInfo(f"channel{channel}", width, (width, width), (4, 8), 8, (0, 1),
                                       (0.0,) * 3, (1.0,) * 3))
        self.register_buffer("filters", torch.randn(width, 1, 3, 3, generator=torch.Generator().manual_seed(0)))
        self.channel = channel

    def forward_features(self, x):
        y = F.relu(F.conv2d(x[:, self.channel : self.channel + 1], self.filters, padding=1))
        return [F.avg_pool2d(y, 4, ceil_mode=True), F.avg_pool2d(y, 8, ceil_mode=True)], y.mean(dim=(2, 3))

    def block_modules(self):
        return []


for _c in (0, 1):
    if f"test-channel{_c}" not in BUILDERS:
        register_extractor(f"test-channel{_c}", lambda rest, c=_c, **kw: ChannelView(c))


def two_signal_batch(n: int, g: torch.Generator, size: int = 32):
    """Channel 0: a horizontal and a vertical bar, 3 px wide (task bars); channel 1: a disc (task discs)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.rand(n, 3, size, size, generator=g) * 0.3
    bars, discs = torch.zeros(n, size, size, dtype=torch.long), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size - 3, (2,), generator=g).tolist()
        bars[i, r : r + 3, :], bars[i, :, c : c + 3] = 1, 1
        cy, cx = torch.randint(6, size - 6, (2,), generator=g).tolist()
        radius = torch.randint(3, 7, (1,), generator=g).item()
        discs[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).long()
    images[:, 0] += 0.7 * bars
    images[:, 1] += 0.7 * discs
    return images.clamp(0, 1), {"bars": bars, "discs": discs}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 24: the gate does not choose by task yet (docs/gate.md)")
@pytest.mark.parametrize("seed", [0, 1])
def test_each_task_gives_its_own_specialist_most_of_the_weight(seed):
    torch.manual_seed(seed)
    config = RouterConfig.from_dict({
        "extractors": [{"spec": "test-channel0", "name": "geo"}, {"spec": "test-channel1", "name": "blob"}],
        "tasks": [{"name": "bars", "type": "seg", "classes": ["bg", "bar"]},
                  {"name": "discs", "type": "seg", "classes": ["bg", "disc"]}],
        "width": 16, "levels": [4, 8], "detail": False,   # no raw-image stem: only the extractors see the image
        "gate": {"granularity": "image", "hidden": 16}, "head": {"seg_hidden": 16, "cls_taps": "level", "aux_weight": 0},
    })
    model = Router(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn, g = build_loss("ce"), torch.Generator().manual_seed(seed)
    for _ in range(100):
        for task in ("bars", "discs"):
            images, targets = two_signal_batch(8, g)
            out = model(images, task=task)
            loss = output_loss(out, "seg", loss_fn, targets[task]) + out["aux_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    images, targets = two_signal_batch(32, torch.Generator().manual_seed(123))
    with torch.no_grad():
        weights = {task: model(images, task=task)["gate_mean"] for task in ("bars", "discs")}
    assert weights["bars"][0] >= 0.8, f"task bars gives geo {weights['bars'][0]:.2f} of the weight (gate {weights})"
    assert weights["discs"][1] >= 0.8, f"task discs gives blob {weights['discs'][1]:.2f} of the weight (gate {weights})"


@pytest.mark.parametrize("key,value", [("temperature", float("nan")), ("temperature", 0.0), ("load_balance_weight", -1.0),
                                       ("entropy_weight", float("inf")), ("load_balance_weight", "0.1")])
def test_gate_numbers_are_checked_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^gate\.{key}: expected a finite number"):
        GateConfig(**{key: value})


def test_probe_mixture_moves_the_weights_towards_each_extractors_posterior_share():
    """With fixed probes the mixture loss's gradient on the gate's logits is w - posterior, per image, where the
    posterior is w_e p_e(mask) / sum_j w_j p_j(mask) and log p_e(mask) sums the probe's log-probabilities over cells."""
    torch.manual_seed(0)
    mix = ProbeMixture([4], 2, {"t": (3, [0])})
    maps = [torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)]
    target = torch.randint(0, 3, (2, 10, 12))  # 2 x 2 pixels per cell: each cell holds a share of each class
    logits = torch.randn(2, 2, requires_grad=True)
    w = logits.softmax(dim=1)
    for p in mix.parameters():
        p.requires_grad_(False)  # the probes fixed: only the mixture term has a gradient, on the logits
    mix("t", {0: maps}, {0: w}, target).backward()
    with torch.no_grad():
        out = mix.probes["t"]["0"](torch.cat(maps, dim=1)).view(2, 2, 3, 5, 6).log_softmax(dim=2)
        share = F.interpolate(F.one_hot(target, 3).movedim(-1, 1).float(), size=(5, 6), mode="area")
        log_mask = (out * share[:, None]).sum(dim=(2, 3, 4))  # B x E
        posterior = (w.log() + log_mask).softmax(dim=1)
    torch.testing.assert_close(logits.grad, (w - posterior) / 2, rtol=1e-4, atol=1e-6)  # mean over the 2 images


def test_probe_mixture_counts_only_labelled_pixels_and_reads_a_classification_map_by_its_mean():
    torch.manual_seed(0)
    mix = ProbeMixture([4, 4], 2, {"seg": (2, [0, 1]), "cls": (5, [1])})
    maps = {0: [torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)], 1: [torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)]}
    w = {k: torch.full((3, 2), 0.5) for k in maps}
    target = torch.randint(0, 2, (3, 16, 16))
    ignored = target.clone()
    ignored[:, :8] = 255  # the top half unlabelled: its cells must not count, whatever their class there
    changed = ignored.clone()
    changed[:, :8] = 1 - target[:, :8]
    a = mix("seg", maps, w, torch.where(ignored == 255, torch.full_like(target, 255), target), ignore_index=255)
    b = mix("seg", maps, w, torch.where(ignored == 255, torch.full_like(target, 255), changed), ignore_index=255)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() != pytest.approx(mix("seg", maps, w, target).item(), rel=1e-3)
    loss = mix("cls", {1: maps[1]}, {1: w[1]}, torch.tensor([0, 4, 2]))
    loss.backward()
    assert mix.probes["cls"]["1"].weight.grad.abs().sum() > 0 and mix.probes["cls"]["1"].weight.shape == (10, 4, 1, 1)


def test_probe_loss_joins_aux_loss_in_training_only_and_adds_probes_for_a_new_task():
    torch.manual_seed(0)
    cfg = {"extractors": [{"spec": "test-channel0", "name": "geo"}, {"spec": "test-channel1", "name": "blob"}],
           "tasks": [{"name": "bars", "type": "seg", "classes": ["bg", "bar"]}],
           "width": 16, "levels": [4, 8], "detail": False, "gate": {"hidden": 16, "probe_weight": 1.0}}
    model = Router(RouterConfig.from_dict(cfg))
    images, targets = two_signal_batch(2, torch.Generator().manual_seed(0))
    with_target = model(images, task="bars", target=targets["bars"])["aux_loss"]
    without = model(images, task="bars")["aux_loss"]
    assert with_target.item() > without.item() + 0.1  # two levels' probe cross-entropy (~2 x ln 2) and mixture
    model.eval()
    assert model(images, task="bars", target=targets["bars"])["aux_loss"].item() == without.item()
    model.add_task(TaskConfig("kind", "cls", ["a", "b", "c"]))
    assert set(model.probes.probes["kind"]) == {str(model.config.cls_level)}
    model.train()
    assert model(images, task="kind", target=torch.tensor([0, 2]))["aux_loss"].item() > 0
    plain = Router(RouterConfig.from_dict({**cfg, "gate": {"hidden": 16}}))
    assert plain.probes is None and not any(k.startswith("probes.") for k in plain.state_dict())


def test_probes_are_saved_and_a_checkpoint_without_them_still_loads(tmp_path):
    cfg = {"extractors": [{"spec": "test-channel0", "name": "geo"}, {"spec": "test-channel1", "name": "blob"}],
           "tasks": [{"name": "bars", "type": "seg", "classes": ["bg", "bar"]}],
           "width": 16, "levels": [4, 8], "detail": False, "gate": {"hidden": 16, "probe_weight": 1.0}}
    model = Router(RouterConfig.from_dict(cfg))
    loaded = Router.from_pretrained(model.save_pretrained(tmp_path / "a"))
    torch.testing.assert_close(loaded.probes.state_dict(), model.probes.state_dict())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("probes.")}
    fresh = Router(RouterConfig.from_dict(cfg))
    fresh.load_checked(state, fresh.extractor_names, "test")  # a model saved before the probes existed
    torch.testing.assert_close(fresh.gate.state_dict(), model.gate.state_dict())
