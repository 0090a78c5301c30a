"""``AnomalyModel.compile_inference``: the compiled backbone and head give the eager model's outputs.

Compiling costs tens of seconds per function even for small models on two CPU cores, so this checks one
small model whose head has the most kinds of work: MSFlow (FrEIA-style couplings with a position
condition, the fusion flow, upsampling, two aggregations and a top-k image score). How much faster the
compiled model runs is measured by ``benchmarks/run.py``.
"""

from __future__ import annotations

import torch

from flowlib.config import seed_everything
from flowlib.models import build_model


def test_compiled_inference_matches_the_eager_model():
    torch._dynamo.reset()
    seed_everything(0)
    model = build_model("msflow", "quick", pretrained=False, input_size=64).eval()
    with torch.no_grad():  # non-zero flow weights, so the heads do real work
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feats = model.extract(images)
        maps, scores = model.predict(feats, (64, 64))
    model.compile_inference()
    with torch.inference_mode():
        feats_c = model.extract(images)
        maps_c, scores_c = model.predict(feats_c, (64, 64))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "nothing was compiled"
    for f, fc in zip(feats, feats_c, strict=True):
        torch.testing.assert_close(fc, f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps_c, maps, rtol=1e-4, atol=1e-5 * float(maps.abs().max()))
    torch.testing.assert_close(scores_c, scores, rtol=1e-4, atol=1e-6)
    assert float(maps.std()) > 0  # the comparison is not between two constant maps
