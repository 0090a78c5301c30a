"""CS-Flow: cross-scale subnet wiring, the whole flow's inverse and log-det, the model's sizes and scores."""

from __future__ import annotations

import pytest
import torch
from flowcheck import jacobian_log_det, randomize
from torch import Tensor, nn

from flowlib.coupling import ChannelPermutation
from flowlib.cross_scale import (
    CrossScaleConv,
    check_pyramid_size,
    cross_scale_flow,
    image_pyramid,
    pyramid_features,
)
from flowlib.models.base import build_model, get_config
from flowlib.models.csflow import CSFlow, CSFlowConfig

#: Flow parameters of the paper preset (EfficientNet-B5 stage 6: 304 channels, hidden 1024, kernels 3,3,3,5).
PAPER_FLOW_PARAMETERS = 275_227_288


def _inputs(channels: int, sides: tuple[int, ...], batch: int = 2, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, s, s, generator=gen, dtype=dtype) for s in sides]


# --- the cross-scale convolution -------------------------------------------------------------------------
def test_cross_scale_conv_starts_at_zero_and_keeps_shapes():
    net = CrossScaleConv([3, 3, 3], [6, 6, 6], hidden=8, kernel_size=3)
    outs = net(_inputs(3, (8, 4, 2)))
    assert [tuple(o.shape) for o in outs] == [(2, 6, 8, 8), (2, 6, 4, 4), (2, 6, 2, 2)]
    assert all(bool((o == 0).all()) for o in outs)
    assert net.gamma.requires_grad and net.gamma.shape == (3,)


def test_cross_scale_conv_layer_count_matches_cs_flow():
    net = CrossScaleConv([152] * 3, [304] * 3, hidden=1024, kernel_size=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 + 3 + 2 + 2  # input, same-scale, up, down
    assert all(c.bias is not None and c.padding == (1, 1) for c in convs)
    assert [c.stride for c in net.down] == [(2, 2), (2, 2)]
    # 3·(152·1024·9 + 1024) + 7·(1024·304·9 + 304) + 3 γ
    assert sum(p.numel() for p in net.parameters()) == 23_819_347


@pytest.mark.parametrize("perturbed, changed", [(0, {0, 1}), (1, {0, 1, 2}), (2, {1, 2})])
def test_cross_scale_conv_only_neighbouring_scales_exchange_information(perturbed, changed):
    """Scale i reads scales i-1 (down path), i and i+1 (up path) and nothing further away."""
    net = randomize(CrossScaleConv([2, 2, 2], [4, 4, 4], hidden=6, kernel_size=3), seed=1)
    xs = _inputs(2, (8, 4, 2))
    base = net(xs)
    xs[perturbed] = xs[perturbed] + 1.0
    moved = {i for i, (a, b) in enumerate(zip(base, net(xs))) if not torch.allclose(a, b)}
    assert moved == changed


def test_cross_scale_conv_rejects_maps_that_do_not_halve():
    net = CrossScaleConv([2, 2], [4, 4], hidden=4)
    with pytest.raises(ValueError, match="twice the size"):
        net([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 3, 3)])


# --- the whole flow --------------------------------------------------------------------------------------
def test_flow_is_a_permutation_with_zero_log_det_at_init():
    channels, sides = 6, (8, 4, 2)
    flow = cross_scale_flow([channels] * 3, kernel_sizes=(3, 3, 3, 5), hidden=8, seed=3)
    xs = _inputs(channels, sides, batch=3)
    zs, log_det = flow(xs)
    assert torch.equal(log_det, torch.zeros(3))
    expected = xs
    for block in flow.blocks:
        if isinstance(block, ChannelPermutation):
            expected, _ = block(expected)
    assert all(torch.equal(z, e) for z, e in zip(zs, expected))
    assert any(not torch.equal(z, x) for z, x in zip(zs, xs))  # the permutations did act


def test_flow_permutations_differ_per_scale_and_block_and_follow_the_seed():
    def perms(seed: int) -> list[tuple[int, ...]]:
        flow = cross_scale_flow([16] * 3, kernel_sizes=(3, 3), hidden=4, seed=seed)
        return [tuple(getattr(b, f"perm{i}").tolist()) for b in flow.blocks[::2] for i in range(3)]

    first = perms(0)
    assert len(set(first)) == len(first) == 6
    assert perms(0) == first and perms(1) != first


@pytest.mark.parametrize("channels", [4, 5])
def test_flow_inverts_and_log_det_matches_autograd_jacobian(channels):
    sides = (4, 2, 1)
    flow = cross_scale_flow([channels] * 3, kernel_sizes=(3, 5), hidden=6, seed=0)
    flow = randomize(flow, seed=2).double()
    xs = _inputs(channels, sides, batch=2, dtype=torch.float64)
    zs, log_det = flow(xs)
    back, log_det_inv = flow(zs, reverse=True)
    assert all(torch.allclose(x, b, atol=1e-10) for x, b in zip(xs, back))
    assert torch.allclose(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64), atol=1e-10)
    assert log_det.abs().min() > 0.1  # the test is not trivially at the identity
    torch.testing.assert_close(jacobian_log_det(lambda v: flow(v)[0], xs), log_det, atol=1e-8, rtol=0)


def test_flow_log_det_is_per_sample():
    """A batch-summed log-det (anomalib's slip) would give every sample the same value."""
    flow = randomize(cross_scale_flow([4] * 3, kernel_sizes=(3,), hidden=6), seed=4)
    xs = _inputs(4, (4, 2, 1), batch=3)
    _, log_det = flow(xs)
    single = torch.cat([flow([x[i:i + 1] for x in xs])[1] for i in range(3)])
    assert log_det.shape == (3,) and torch.allclose(log_det, single, atol=1e-5)
    assert log_det.unique().numel() == 3


# --- pyramid ---------------------------------------------------------------------------------------------
def test_image_pyramid_is_nearest_subsampling():
    images = torch.rand(2, 3, 16, 16)
    levels = image_pyramid(images, 3)
    assert [tuple(x.shape[-2:]) for x in levels] == [(16, 16), (8, 8), (4, 4)]
    # nearest ×1/2 keeps every second pixel (it picks pixels, so it commutes with normalisation)
    assert torch.equal(levels[1], images[..., ::2, ::2])
    assert torch.equal(levels[2], images[..., ::4, ::4])
    assert torch.equal(levels[0], images)


def test_pyramid_features_calls_backbone_per_level():
    seen = []

    def backbone(x: Tensor) -> list[Tensor]:
        seen.append(tuple(x.shape))
        return [x.mean(1, keepdim=True), x]

    maps = pyramid_features(backbone, torch.rand(1, 3, 8, 8), 3)
    assert seen == [(1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 2, 2)]
    assert [tuple(m.shape) for m in maps] == [(1, 1, 8, 8), (1, 1, 4, 4), (1, 1, 2, 2)]


@pytest.mark.parametrize("size, ok", [(768, True), (256, True), (384, True), (128, True), (320, False),
                                      (96, False)])
def test_pyramid_size_check(size, ok):
    if ok:
        check_pyramid_size(size, 32, 3)
    else:
        with pytest.raises(ValueError, match=f"input_size={size}.*multiple of 128"):
            check_pyramid_size(size, 32, 3)


# --- scoring on hand-made latents ------------------------------------------------------------------------
def test_image_score_is_mean_half_square_over_all_scales():
    zs = [torch.full((2, 3, 4, 4), 2.0), torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 1, 1)]
    zs[1][1] = 4.0
    scores = CSFlow.image_scores(zs)
    n = 3 * (16 + 4 + 1)
    assert torch.allclose(scores, torch.tensor([0.5 * 4 * 48 / n, 0.5 * (4 * 48 + 16 * 12) / n]))


def test_scale_maps_and_combination():
    zs = [torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]
    zs[0][0, :, 3, 3] = 3.0  # a hot spot in the bottom-right corner of the largest scale
    zs[2][0] = 2.0           # the coarsest scale is uniformly higher
    maps = CSFlow.scale_maps(zs, (8, 8))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8)] * 3
    assert torch.allclose(maps[1], torch.ones(1, 8, 8))
    assert torch.allclose(maps[2], torch.full((1, 8, 8), 4.0))
    assert maps[0][0, 7, 7] == 9.0 and maps[0][0, 0, 0] == 1.0

    class Holder:
        def __init__(self, mode: str) -> None:
            self.config = CSFlowConfig(anomaly_map=mode)

    largest = CSFlow.combine_maps(Holder("largest"), maps)
    product = CSFlow.combine_maps(Holder("product"), maps)
    assert torch.equal(largest, maps[0])
    assert torch.allclose(product, maps[0] * 4.0)


# --- configuration and presets ---------------------------------------------------------------------------
def test_presets_follow_the_paper():
    cfg = get_config("csflow", "paper")
    assert (cfg.backbone, cfg.layer, cfg.input_size, cfg.n_scales) == ("efficientnet_b5", "blocks.5", 768, 3)
    assert (cfg.kernel_sizes, cfg.hidden_channels) == ((3, 3, 3, 5), 1024)
    assert (cfg.clamp, cfg.leaky_slope, cfg.anomaly_map) == (3.0, 0.1, "product")
    assert (cfg.lr, cfg.adam_eps, cfg.weight_decay, cfg.grad_clip) == (2e-4, 1e-4, 1e-5, 1.0)
    assert (cfg.epochs, cfg.batch_size) == (240, 16)
    assert get_config("csflow", "paper-256").input_size == 256
    quick = get_config("csflow", "quick")
    assert quick.backbone == "efficientnet_lite0" and quick.input_size % 128 == 0


def test_bad_settings_give_clear_errors():
    with pytest.raises(ValueError, match="anomaly_map='max'"):
        build_model("csflow", "quick", anomaly_map="max", pretrained=False)
    with pytest.raises(ValueError, match="input_size=200"):
        build_model("csflow", "quick", input_size=200, pretrained=False)


# --- the model -------------------------------------------------------------------------------------------
def test_paper_flow_parameter_count():
    """275.2 M flow parameters (hidden 1024, kernels 3, 3, 3, 5, 304 channels); built on the meta device."""
    with torch.device("meta"):
        flow = cross_scale_flow([304] * 3, kernel_sizes=(3, 3, 3, 5), hidden=1024)
    per_block = [sum(p.numel() for p in b.parameters()) for b in flow.blocks[1::2]]
    assert per_block == [47_638_694] * 3 + [132_311_206]
    assert sum(per_block) == PAPER_FLOW_PARAMETERS
    assert abs(PAPER_FLOW_PARAMETERS / 275.2e6 - 1) < 0.005


@pytest.mark.slow
def test_paper_preset_without_weights_has_the_paper_sizes():
    """EfficientNet-B5 at 768 px: maps (304, 24, 24), (304, 12, 12), (304, 6, 6); only the flow trains."""
    model = build_model("csflow", "paper", pretrained=False)
    assert model.backbone.channels == [304] and model.backbone.strides == [32]
    assert model.feature_shapes(768) == [(304, 24, 24), (304, 12, 12), (304, 6, 6)]
    assert model.feature_shapes(256) == [(304, 8, 8), (304, 4, 4), (304, 2, 2)]
    assert sum(p.numel() for p in model.flow.parameters()) == PAPER_FLOW_PARAMETERS
    assert model.num_trainable_parameters() == PAPER_FLOW_PARAMETERS
    assert set(model.head_state_dict()) == {f"flow.{k}" for k in model.flow.state_dict()}


def test_extract_runs_the_backbone_on_the_nearest_pyramid():
    model = build_model("csflow", "quick", input_size=256, hidden_channels=8, pretrained=False)
    images = torch.rand(2, 3, 256, 256)
    feats = model.extract(images)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 8, 8), (2, 192, 4, 4), (2, 192, 2, 2)]
    assert [tuple(f.shape[1:]) for f in feats] == model.feature_shapes()
    with torch.no_grad():
        expected = model.backbone(images[..., ::4, ::4])[0]
    assert torch.allclose(feats[2], expected, atol=1e-5)


def test_model_loss_scores_and_maps_at_initialisation():
    model = build_model("csflow", "quick", input_size=256, hidden_channels=8, pretrained=False)
    feats = _inputs(192, (8, 4, 2), batch=3)
    zs, log_det = model(feats)
    assert torch.equal(log_det, torch.zeros(3))
    n = 192 * (64 + 16 + 4)
    half_sq = 0.5 * sum(f.pow(2).flatten(1).sum(1) for f in feats)
    assert torch.allclose(model.loss(feats), (half_sq / n).mean())
    maps, scores = model.predict(feats, (64, 64))
    assert maps.shape == (3, 64, 64) and torch.allclose(scores, half_sq / n)
    assert torch.all(maps >= 0)


def test_optimizer_follows_the_paper():
    model = build_model("csflow", "quick", input_size=256, hidden_channels=8, pretrained=False)
    opt, scheduler = model.configure_optimizers(steps_per_epoch=4)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam) and scheduler is None
    assert (group["eps"], group["weight_decay"]) == (1e-4, 1e-5)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.flow.parameters())


@pytest.mark.slow
def test_quick_preset_detects_demo_defects(tmp_path):
    """The quick preset on one built-in category, end to end through the engine (features cached once).

    An untrained flow (z = permuted features, score = mean feature energy) scores about 0.6 image AUROC here.
    """
    from flowlib.engine import run

    records = run("csflow", dataset="demo", categories="brick", preset="quick", seed=0, out=tmp_path,
                  progress=False)
    metrics = records[0]["metrics"]
    assert metrics["image_auroc"] >= 0.85, metrics
    assert metrics["pixel_auroc"] >= 0.88, metrics
