"""Training on cached backbone features is training on live features, only faster.

With a frozen backbone (eval mode, no gradients) ``model.extract`` is a fixed function of the image, so
a step on features computed once beforehand must give the same loss and the same update as a step that
runs the backbone again. These tests check that for every method, step by step, and through the
engine's two paths (:func:`flowlib.engine.fit` on a dataset with ``cache_features=False`` versus on an
:class:`~flowlib.engine.FeatureSet`). How much faster the cached epochs are is measured by
``benchmarks/run.py`` (``train_cached`` against ``train_live``), not here: timing asserts are not
reliable on a shared two-core machine.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from flowlib import engine
from flowlib.config import seed_everything
from flowlib.models import build_model

# every method at a small input size, without pretrained weights (the property does not depend on them)
SMALL = {
    "fastflow": {"input_size": 64},
    "csflow": {"input_size": 128, "hidden_channels": 16, "kernel_sizes": (3, 5)},
    "msflow": {"input_size": 64},
    "hgad": {"input_size": 64},
    "gaussian": {"input_size": 64},
}


class TinyImages(Dataset):
    """``n`` seeded random images in the sample-dict format of :mod:`flowlib.data`."""

    def __init__(self, n: int, side: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, side, side, generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        side = self.images.shape[-1]
        return {"image": self.images[i], "mask": torch.zeros(1, side, side), "label": 0, "defect": "good",
                "path": f"tiny/{i:03d}.png", "category": "tiny", "class_id": 0}


def _model(method: str, **overrides):
    seed_everything(0)
    return build_model(method, "quick", pretrained=False, **{**SMALL[method], **overrides})


def _train(model, batches, cached: dict[int, list[torch.Tensor]] | None) -> list[float]:
    """A few optimiser steps over fixed index batches; features from ``cached`` or from the backbone."""
    seed_everything(123)  # methods that sample positions per step (HGAD) draw the same ones in both runs
    optimizer, scheduler = model.configure_optimizers(len(batches))
    model.train()
    losses = []
    for images, idx in batches:
        feats = [f[idx] for f in cached["features"]] if cached is not None else model.extract(images)
        loss = model.loss(feats, torch.zeros(len(idx), dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if model.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), model.config.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("method", sorted(SMALL))
def test_cached_features_give_the_same_losses_and_weights_as_live_ones(method: str) -> None:
    live_model, cached_model = _model(method), _model(method)
    data = TinyImages(6, live_model.config.input_size)
    # three steps over two epochs' worth of batches, in a fixed order shared by both runs
    order = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([5, 0, 3])]
    batches = [(data.images[idx], idx) for idx in order]

    cache = engine.extract_features(cached_model, data, batch_size=4, progress=False)
    # the cache holds what the backbone gives for each image on its own (batch composition is irrelevant)
    single = cached_model.extract(data.images[4:5])
    for f_cache, f_single in zip(cache.features, single, strict=True):
        torch.testing.assert_close(f_cache[4:5], f_single, rtol=1e-4, atol=1e-4)

    live = _train(live_model, batches, None)
    cached = _train(cached_model, batches, {"features": cache.features})
    assert all(torch.isfinite(torch.tensor(live)))
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=1e-4, atol=1e-5)
    assert live[0] != live[-1], "the steps changed nothing, so the comparison would prove nothing"
    for (name, p_live), (_, p_cached) in zip(live_model.named_parameters(), cached_model.named_parameters(),
                                             strict=True):
        if p_live.requires_grad:
            torch.testing.assert_close(p_cached, p_live, rtol=1e-4, atol=1e-5, msg=name)
    # the frozen backbone was not touched by either run
    for p_live, p_cached in zip(live_model.backbone.parameters(), cached_model.backbone.parameters(),
                                strict=True):
        assert not p_live.requires_grad and torch.equal(p_live, p_cached)


@pytest.mark.parametrize("method", ["fastflow", "hgad"])
def test_engine_fit_on_a_feature_set_equals_fit_on_the_dataset(method: str) -> None:
    """The engine's two paths: live extraction per batch versus a cache made up front.

    Both paths draw the same shuffled batches (here three per epoch, in a different order each epoch),
    and neither touches the global random state that HGAD's position sampling uses, so the losses agree
    up to the float rounding of sums over different batch compositions.
    """
    live_model = _model(method, cache_features=False)
    cached_model = _model(method)
    data = TinyImages(6, live_model.config.input_size)
    seed_everything(7)
    live = engine.fit(live_model, data, epochs=3, batch_size=2, progress=False)
    cache = engine.extract_features(cached_model, data, batch_size=4, progress=False)
    seed_everything(7)
    cached = engine.fit(cached_model, cache, epochs=3, batch_size=2, progress=False)
    live_losses = torch.tensor([h["loss"] for h in live])
    cached_losses = torch.tensor([h["loss"] for h in cached])
    torch.testing.assert_close(cached_losses, live_losses, rtol=1e-4, atol=1e-4)
    assert live_losses[0] > live_losses[-1], "training did not lower the loss"
    # a different shuffling seed gives different batches, hence different losses: the check can fail
    other = engine.fit(_model(method), cache, epochs=3, batch_size=2, seed=1, progress=False)
    assert not torch.allclose(torch.tensor([h["loss"] for h in other]), cached_losses, rtol=1e-4, atol=1e-4)


class _LabelledTinyImages(TinyImages):
    """Odd samples are "defective", with a square of defect pixels (a test set for ``evaluate``)."""

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        if i % 2:
            sample["label"], sample["defect"] = 1, "square"
            sample["mask"][:, :8, :8] = 1.0
        return sample


@pytest.mark.parametrize("method", ["fastflow", "hgad"])
@pytest.mark.parametrize("cache", [False, True])
def test_training_goes_on_after_an_evaluation_in_inference_mode(method, cache):
    """``evaluate`` runs under ``torch.inference_mode()``; nothing it computes may leak into training.

    An inference tensor kept by the model (a cached buffer, a stored statistic) would make the next
    backward pass fail, so train, evaluate every epoch, and check that every epoch trained.
    """
    model = _model(method, cache_features=cache)
    side = SMALL[method]["input_size"]
    data = TinyImages(4, side)
    history = engine.fit(model, data, epochs=2, batch_size=2, seed=0, progress=False,
                         eval_set=_LabelledTinyImages(4, side, seed=1), eval_every=1)
    assert len(history) == 2 and all("metrics" in h for h in history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    for p in model.trainable_parameters():
        assert not p.is_inference()
