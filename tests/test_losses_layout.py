"""heads.losses computes its softmaxes over the classes along dim 1 of the B x K x P view (issue 28: ~10x faster on
the CPU than over a short last dim): the losses and their gradients equal those of the last-dim softmax they used.
The class decision (``class_argmax``, evaluation and ``predict``) is ``max(dim).indices``: equal to argmax, ties and
NaN included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backbone_router.heads.losses as losses
from backbone_router.heads.losses import build_loss, class_argmax, class_softmax

SPECS = [
    "ce",
    {"name": "ce", "class_weights": [1.0, 2.0, 0.5], "label_smoothing": 0.1},
    {"name": "dice", "per_image": True},
    {"name": "tversky", "alpha": 0.3, "beta": 0.7, "classes": "all"},
    {"name": "focal", "gamma": 2.0, "alpha": [0.2, 0.5, 0.3]},
]


def last_dim_softmax(logits: torch.Tensor, log: bool = False) -> torch.Tensor:
    """What the losses computed before: (log-)softmax over the last dim of B x P x K."""
    return (F.log_softmax if log else F.softmax)(logits, dim=-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s))
@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (4, 3)], ids=["seg", "cls"])
def test_losses_equal_the_last_dim_softmax(spec, shape, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(*shape, generator=gen)).requires_grad_(True)
    target = torch.randint(0, 3, (shape[0], *shape[2:]), generator=gen)
    target.view(-1)[:5] = 255
    loss = build_loss(spec)
    values = []
    for softmax in (class_softmax, last_dim_softmax):
        monkeypatch.setattr(losses, "class_softmax", softmax)
        value = loss(logits, target, ignore_index=255)["loss"]
        values.append((value, *torch.autograd.grad(value, logits)))
    for new, old in zip(*values):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)


def test_class_softmax_of_a_strided_view():
    x = torch.randn(2, 4, 5, 6)
    flat = x.flatten(2).transpose(1, 2)  # B x P x K, as the losses see it
    torch.testing.assert_close(class_softmax(flat), F.softmax(flat, dim=-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(class_softmax(flat, log=True), F.log_softmax(flat, dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("classes", [2, 3, 11])
def test_class_argmax_equals_argmax_with_ties_and_nan(classes):
    torch.manual_seed(classes)
    x = torch.randint(0, 3, (4, classes, 9, 7)).float()  # small integers: many ties, where the first index counts
    x[0, classes - 1, 2, 3] = float("nan")  # NaN counts as the largest
    x[1, :, 0, 0] = float("nan")
    for logits in (x, x.transpose(2, 3), torch.randn(3, classes, 5, 4)):
        assert torch.equal(class_argmax(logits), logits.argmax(1))
        assert torch.equal(class_argmax(logits[0], 0), logits[0].argmax(0))
