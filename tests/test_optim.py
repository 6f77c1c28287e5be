"""train/training/optim.py's AdamW: one optimizer over every group, fused (or foreach) instead of torch's per-tensor loop,
with the same updates as the per-tensor path it replaces (both computed here, in the same run)."""

from __future__ import annotations

import pytest
import torch

from backbone_router.router import Router
from backbone_router.train.training.config import TrainConfig
from backbone_router.train.training.optim import adamw_implementation, make_optimizer, set_lrs

STEPS = 6
# fused / foreach AdamW regroup the same float32 arithmetic (sqrt, division, lerp); measured here after 6 steps the
# largest difference was ~1e-7 on parameters of size ~1e-1 (a few float32 ulps); the bound leaves room for that.
RTOL, ATOL = 1e-5, 1e-6


def trained_copy(make, implementation: dict | None, steps: int = STEPS) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh model from `make`, trained `steps` AdamW steps on a fixed regression loss, through make_optimizer
    (implementation None) or the same groups in torch.optim.AdamW with `implementation` forced."""
    torch.manual_seed(0)
    model = make()
    params = [p for p in model.parameters() if p.requires_grad]
    head, late = params[: len(params) // 2], params[len(params) // 2:]
    t = TrainConfig(lr=3e-2, weight_decay=0.05, phase2_lr_scale=0.1, warmup_steps=2, max_steps=steps)
    opt = make_optimizer(head, t, late)
    if implementation is not None:  # the old construction: the same groups, torch's per-tensor loop on a CPU
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), **implementation)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 40, 40, generator=gen)
    for step in range(steps):
        set_lrs(opt, 1.0 / (step + 1), 0.5)
        out = model(x, task="demo_seg")
        target = torch.rand(out["seg"].shape, generator=gen)
        ((out["seg"] - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def tiny_router():
    return Router.from_config("configs/tiny.yaml")


def test_make_optimizer_is_one_adamw_with_a_fused_or_foreach_update():
    model = tiny_router()
    opt = make_optimizer(model.parameters(), TrainConfig())
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    fused = {g["fused"] for g in opt.param_groups}
    foreach = {g["foreach"] for g in opt.param_groups}
    assert fused == {True} or foreach == {True}, (fused, foreach)
    assert adamw_implementation(model.parameters()) == {"fused": True}  # torch >= 2.4 has the CPU kernel
    assert adamw_implementation([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]) == {"foreach": True}


@pytest.mark.parametrize("implementation", [{"fused": True}, {"foreach": True}])
def test_fused_and_foreach_give_the_per_tensor_paths_parameters(implementation):
    """After 6 steps with a schedule, two lr groups and weight decay, the parameters of make_optimizer (fused)
    and of forced foreach both equal those of torch's per-tensor loop (foreach=False, the old default on a CPU)."""
    old, _ = trained_copy(tiny_router, {"foreach": False})
    new, opt = trained_copy(tiny_router, None if implementation == {"fused": True} else implementation)
    (key,) = implementation
    assert [g[key] for g in opt.param_groups] == [True] * len(opt.param_groups)
    before = dict(tiny_router_state())
    moved = []
    for (name, a), (_, b) in zip(old.named_parameters(), new.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        if not torch.allclose(a, before[name], rtol=RTOL, atol=ATOL):
            moved.append(name)
    # Not vacuous: the steps moved the parameters that had gradients (the demo_seg path: 101 of the 198 tensors
    # here) by much more than the tolerance.
    assert len(moved) > 90 and any(n.startswith("seg_head.") for n in moved) and any(".levels." in n for n in moved)


def tiny_router_state():
    torch.manual_seed(0)
    return {n: p.detach().clone() for n, p in tiny_router().named_parameters()}
