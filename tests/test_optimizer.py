"""Every method trains with PyTorch's fused Adam where the device allows it, and that changes nothing.

The fused kernel updates a parameter in one pass instead of a dozen elementwise operations; how much
faster it is, is measured by ``benchmarks/run.py`` (training steps). Here we check that the methods
really get it and that it follows the same trajectory as the default implementation, up to float
rounding, on real gradients of real flows, with parameter groups and a learning-rate schedule.
"""

from __future__ import annotations

import pytest
import torch

from flowlib.config import seed_everything
from flowlib.models import base, build_model
from flowlib.models.base import adam

SMALL = {
    "fastflow": {"input_size": 64},
    "csflow": {"input_size": 128, "hidden_channels": 16, "kernel_sizes": (3, 5)},
    "msflow": {"input_size": 64},
    "hgad": {"input_size": 64},
}


def _model(method: str):
    seed_everything(0)
    return build_model(method, "quick", pretrained=False, **SMALL[method])


@pytest.mark.parametrize("method", sorted(SMALL))
def test_every_method_gets_the_fused_adam_on_the_cpu(method):
    optimizer, _ = _model(method).configure_optimizers(steps_per_epoch=3)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["fused"] is True


def _trajectory(method: str, fused: bool, monkeypatch, steps: int = 6
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train a small model for ``steps`` steps on fixed features with the fused or the plain Adam.

    The method's own ``configure_optimizers`` builds both (same groups, settings and schedule); the plain
    one is had by offering the fused kernel on no device.
    """
    if not fused:
        monkeypatch.setattr(base, "_FUSED_ADAM_DEVICES", ())
    model = _model(method)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, model.config.input_size, model.config.input_size, generator=gen)
    features = model.extract(images)
    optimizer, scheduler = model.configure_optimizers(steps_per_epoch=2)
    assert optimizer.defaults["fused"] is fused
    model.train()
    seed_everything(5)  # HGAD samples positions per step: the same ones for both implementations
    losses = []
    for _ in range(steps):
        loss = model.loss(features, torch.zeros(4, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    monkeypatch.undo()
    return losses, {k: v.detach().clone() for k, v in model.head_state_dict().items()}


@pytest.mark.parametrize("method", sorted(SMALL))
def test_fused_adam_follows_the_default_adam(method, monkeypatch):
    losses_fused, state_fused = _trajectory(method, True, monkeypatch)
    losses_plain, state_plain = _trajectory(method, False, monkeypatch)
    assert losses_fused == pytest.approx(losses_plain, rel=1e-4, abs=1e-6)
    initial = _model(method).head_state_dict()
    moved = 0
    for name, plain in state_plain.items():
        torch.testing.assert_close(state_fused[name], plain, rtol=1e-4, atol=1e-5, msg=name)
        moved += int(not torch.equal(plain, initial[name]))
    assert moved > 0, "the steps changed no parameter: the comparison would be vacuous"


def test_adam_keeps_the_default_kernel_where_fused_is_not_offered():
    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert adam([on_meta], lr=1e-3).defaults["fused"] is False
    cpu = torch.nn.Parameter(torch.zeros(3))
    assert adam([{"params": [cpu]}, {"params": [on_meta], "lr": 1e-2}]).defaults["fused"] is False
    assert adam([cpu], foreach=True).defaults["foreach"] is True  # an explicit choice is kept
    assert adam([cpu], fused=False).defaults["fused"] is False
