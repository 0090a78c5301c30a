"""MSFlow: parallel and fusion flows (invertibility, exact log-dets), the two aggregations on hand-made
maps, the learning-rate schedule, the paper preset's parameter count and a quick training run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from flowcheck import jacobian_log_det, randomize
from torch import Tensor, nn

from flowlib.aggregation import (
    detection_map,
    localisation_map,
    log_likelihood_map,
    msflow_scores,
    top_k_mean,
)
from flowlib.fusion import FusionSubnet, fusion_flow
from flowlib.models.msflow import MSFlow, MSFlowConfig, lr_factor, parallel_flow
from flowlib.resize import resize_sum
from flowlib.subnets import conv_ln_subnet

# -- parallel flow -----------------------------------------------------------------------------------

def test_parallel_flow_inverts_and_log_det_matches_jacobian() -> None:
    torch.manual_seed(0)
    flow = randomize(parallel_flow(6, n_blocks=3, clamp=1.9, cond_channels=4), seed=1, add=True).double()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    cond = torch.randn(1, 4, 4, 3, dtype=torch.float64)
    z, log_det = flow(x, cond=cond)
    assert z.shape == x.shape and log_det.shape == (2,)
    back, log_det_inv = flow(z, cond=cond, reverse=True)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    brute = jacobian_log_det(lambda v: flow(v, cond=cond)[0], x)
    torch.testing.assert_close(log_det, brute, atol=1e-8, rtol=1e-8)
    assert log_det.abs().min() > 0.1  # a real test: the map is far from volume-preserving


def test_parallel_flow_depends_on_the_condition() -> None:
    torch.manual_seed(0)
    flow = randomize(parallel_flow(4, n_blocks=2, cond_channels=4), seed=2, add=True)
    x = torch.randn(1, 4, 3, 3)
    z1, _ = flow(x, cond=torch.zeros(1, 4, 3, 3))
    z2, _ = flow(x, cond=torch.ones(1, 4, 3, 3))
    assert not torch.allclose(z1, z2)
    with pytest.raises(ValueError, match="cond"):
        flow(x)


# -- fusion flow -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [[4, 6, 8], [4, 5, 3]])
def test_fusion_flow_inverts_and_log_det_matches_jacobian(channels: list[int]) -> None:
    torch.manual_seed(0)
    flow = randomize(fusion_flow(channels, clamp=1.9), seed=3, add=True).double()
    sizes = [(6, 6), (3, 3), (2, 2)]  # 3 → 2 is not an integer ratio: pooling is adaptive
    xs = [torch.randn(2, c, *s, dtype=torch.float64) for c, s in zip(channels, sizes)]
    zs, log_det = flow(xs)
    assert [z.shape for z in zs] == [x.shape for x in xs] and log_det.shape == (2,)
    back, log_det_inv = flow(zs, reverse=True)
    for b, x in zip(back, xs):
        torch.testing.assert_close(b, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    brute = jacobian_log_det(lambda v: flow(v)[0], xs)
    torch.testing.assert_close(log_det, brute, atol=1e-8, rtol=1e-8)
    assert log_det.abs().min() > 0.1


def test_fusion_subnet_exchanges_information_across_scales() -> None:
    torch.manual_seed(0)
    net = randomize(FusionSubnet([2, 3, 4], [4, 6, 8]), seed=4, add=True)
    xs = [torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2, 2)]
    out = net(xs)
    assert [tuple(o.shape) for o in out] == [(1, 4, 8, 8), (1, 6, 4, 4), (1, 8, 2, 2)]
    # changing only the coarsest input changes the finest output, and vice versa
    coarse = [xs[0], xs[1], xs[2] + 1.0]
    fine = [xs[0] + 1.0, xs[1], xs[2]]
    assert not torch.allclose(net(coarse)[0], out[0])
    assert not torch.allclose(net(fine)[2], out[2])


@pytest.mark.parametrize(("c_in", "c_out", "side", "batch"), [(28, 24, 32, 1), (72, 112, 8, 4), (6, 8, 5, 2)])
def test_channels_last_weight_after_the_layer_norm_changes_no_value(c_in: int, c_out: int, side: int,
                                                                    batch: int) -> None:
    """The convolution after ChannelLayerNorm keeps its weight channels-last (no conversion per call);
    outputs and every gradient equal those of the same subnet with a channels-first weight, bit for bit."""
    torch.manual_seed(0)
    net = conv_ln_subnet(3)(c_in, c_out)
    assert net[3].weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(net)
    plain[3].weight.data = plain[3].weight.data.contiguous()
    x = torch.randn(batch, c_in, side, side, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    y, y_plain = net(x), plain(x_plain)
    assert torch.equal(y, y_plain)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_plain.backward(grad)
    assert torch.equal(x.grad, x_plain.grad)
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    fusion = FusionSubnet([4, 8], [8, 16])
    assert fusion.mix[3].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("c_x", "c_cond", "cond_batch", "batch"),
                         [(12, 16, 1, 4), (56, 16, 1, 3), (5, 3, 2, 2), (5, 3, 1, 1), (6, 0, 0, 3)])
def test_conv_ln_subnet_equals_the_subnet_on_the_concatenated_input(c_x: int, c_cond: int, cond_batch: int,
                                                                    batch: int) -> None:
    """The subnet takes the passive half and the condition apart (a shared condition's part of the first
    convolution computed once, channels-last inside); outputs and gradients equal those of the plain
    layer stack on ``cat(x, cond)`` up to float rounding."""
    torch.manual_seed(0)
    net = randomize(conv_ln_subnet(3)(c_x + c_cond, 10), seed=5, add=True)
    x = torch.randn(batch, c_x, 9, 7, requires_grad=True)
    cond = torch.randn(cond_batch, c_cond, 9, 7) if c_cond else None
    y = net(x, cond)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_net = copy.deepcopy(net)
    inp = x_ref if cond is None else torch.cat([x_ref, cond.expand(batch, -1, -1, -1)], dim=1)
    ref = nn.Sequential.forward(ref_net, inp)  # the four layers one after the other, no split
    assert y.shape == ref.shape == (batch, 10, 9, 7)
    assert y.is_contiguous()  # handed back in the coupling's layout (mixed layouts are slow elementwise)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.norm.weight", "1.norm.bias",
                                     "3.weight", "3.bias"}  # the names of the plain Sequential


def test_conv_ln_subnet_concatenates_when_its_first_layer_cannot_be_split() -> None:
    """The split path convolves with zero padding and one group; for a grouped or reflect-padded first
    convolution the subnet convolves the concatenation, so the function stays that of the layer stack."""
    from flowlib.subnets import ChannelLayerNorm, ConvLayerNormSubnet

    torch.manual_seed(0)
    x, cond = torch.randn(3, 4, 6, 6), torch.randn(1, 4, 6, 6)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    for first in (grouped, nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")):
        net = ConvLayerNormSubnet(first, ChannelLayerNorm(8), nn.ReLU(), nn.Conv2d(8, 6, 1))
        ref = nn.Sequential.forward(net, torch.cat([x, cond.expand(3, -1, -1, -1)], dim=1))
        torch.testing.assert_close(net(x, cond), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(net[1:], ConvLayerNormSubnet)  # slicing, as for any Sequential


def test_fusion_heads_are_one_convolution_with_the_same_values() -> None:
    torch.manual_seed(0)
    net = FusionSubnet([12, 20], [24, 40])
    f = torch.randn(3, 12, 16, 16, requires_grad=True)
    f_ref = f.detach().clone().requires_grad_(True)
    out = net._heads(f, net.conv_s[0], net.conv_t[0])
    ref = torch.cat([net.conv_s[0](f_ref), net.conv_t[0](f_ref)], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.backward(torch.ones_like(out))
    grads = [p.grad.clone() for p in (*net.conv_s[0].parameters(), *net.conv_t[0].parameters())]
    net.zero_grad()
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, (*net.conv_s[0].parameters(), *net.conv_t[0].parameters())):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


def test_fusion_subnet_parameter_count() -> None:
    # halves 128/256/512 of Wide-ResNet-50: mixing 896 → 224 → 896 (+ LayerNorm), heads s and t per scale
    net = FusionSubnet([128, 256, 512], [256, 512, 1024])
    mix = (896 * 224 * 9 + 224) + 2 * 224 + (224 * 896 * 9 + 896)
    heads = 2 * sum(c * c * 9 + c for c in (128, 256, 512))
    assert sum(p.numel() for p in net.parameters()) == mix + heads == 9_809_184


# -- aggregations ------------------------------------------------------------------------------------

def _two_spot_maps() -> list[Tensor]:
    """Two scales on a 2×2 grid: position (0, 1) is mildly unlikely at both scales, position (1, 0)
    is very unlikely at one scale only; (0, 0) and (1, 1) are normal."""
    fine = torch.tensor([[[0.0, -1.0], [-3.0, 0.0]]])
    coarse = torch.tensor([[[0.0, -1.0], [0.0, 0.0]]])
    return [fine, coarse]


def test_detection_map_hand_made() -> None:
    det = detection_map(_two_spot_maps(), (2, 2))
    # log-likelihood sums: 0, -2, -3, 0 → A_mul = 1 - exp(sum - max)
    expected = torch.tensor([[[0.0, 1 - math.exp(-2)], [1 - math.exp(-3), 0.0]]])
    torch.testing.assert_close(det, expected)
    # the product ranks the single strong response first
    assert det[0, 1, 0] > det[0, 0, 1]
    # top-k with k = ⌊4 · 0.5⌋ = 2: mean of the two largest values
    torch.testing.assert_close(top_k_mean(det, 0.5), torch.tensor([(2 - math.exp(-2) - math.exp(-3)) / 2]))
    torch.testing.assert_close(top_k_mean(det, 0.25), torch.tensor([1 - math.exp(-3)]))


def test_localisation_map_hand_made() -> None:
    loc = localisation_map(_two_spot_maps(), (2, 2))
    # per-scale probabilities summed: 2, 2e^-1, 1 + e^-3, 2 → A_add = 2 - sum
    expected = torch.tensor([[[0.0, 2 - 2 * math.exp(-1)], [1 - math.exp(-3), 0.0]]])
    torch.testing.assert_close(loc, expected)
    # the sum ranks the position that is unlikely at both scales first: the opposite of the product
    assert loc[0, 0, 1] > loc[0, 1, 0]


def test_maps_are_normalised_per_image_and_per_scale() -> None:
    maps = _two_spot_maps()
    shifted = [maps[0] - 7.0, maps[1] + 2.0]  # a different constant per scale
    torch.testing.assert_close(localisation_map(shifted, (2, 2)), localisation_map(maps, (2, 2)))
    torch.testing.assert_close(detection_map(shifted, (2, 2)), detection_map(maps, (2, 2)))
    batch = [torch.cat([m, m - 5.0]) for m in maps]  # second image: same map, another offset
    loc = localisation_map(batch, (2, 2))
    torch.testing.assert_close(loc[0], loc[1])


def test_upsampling_is_bilinear_with_aligned_corners() -> None:
    lp = torch.tensor([[[0.0, -4.0], [0.0, 0.0]]])
    loc = localisation_map([lp], (3, 3))
    p = math.exp(-4.0)
    # align_corners=True keeps the four corners and puts the mean of the 2×2 grid in the centre
    expected = 1.0 - torch.tensor([[[1.0, (1 + p) / 2, p], [1.0, (3 + p) / 4, (1 + p) / 2],
                                    [1.0, 1.0, 1.0]]])
    torch.testing.assert_close(loc, expected)
    det = detection_map([lp], (3, 3))
    torch.testing.assert_close(det[0, 1, 1], torch.tensor(1 - math.exp(-1.0)))  # centre log-lik is -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_detection_map_unchanged_by_its_exponent_floor(dtype: torch.dtype) -> None:
    """The floor on exp's argument (it keeps exp out of slow subnormal results) changes no value."""
    gen = torch.Generator().manual_seed(0)
    logps = [-torch.rand(2, 8, 8, generator=gen, dtype=dtype) * 400.0,
             -torch.rand(2, 4, 4, generator=gen, dtype=dtype) * 400.0]
    logps[0][0, 3, 3] = 5.0  # one position far more likely than the rest
    total = resize_sum(logps, (32, 32), align_corners=True)  # the upsampled sum (tests/test_resize.py)
    shifted = total - total.flatten(1).amax(1).view(-1, 1, 1)
    assert (shifted < -100).float().mean() > 0.5  # the floor binds for most positions
    prob = torch.exp(shifted)  # the definition, no floor
    expected = prob.flatten(1).amax(1).view(-1, 1, 1) - prob
    det = detection_map(logps, (32, 32))
    torch.testing.assert_close(det, expected, rtol=0, atol=0)


def test_scores_from_latents() -> None:
    zs = [torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 4, 4)]
    zs[0][1, :, 2, 3] = 3.0  # an outlier in the second image only
    torch.testing.assert_close(log_likelihood_map(zs[0])[1, 2, 3], torch.tensor(-4.5))
    loc, det, score = msflow_scores(zs, (16, 16), top_k=0.03)
    assert loc.shape == det.shape == (2, 16, 16) and score.shape == (2,)
    assert score[0] == 0 and score[1] > 0.1
    assert det[1].argmax() == loc[1].argmax()
    with pytest.raises(ValueError, match="top_k"):
        top_k_mean(det, 3.0)


# -- learning-rate schedule --------------------------------------------------------------------------

def test_lr_factor_matches_official_schedulers() -> None:
    cfg = MSFlowConfig()
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=12)
    decay = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[70, 90], gamma=0.33)
    for epoch in range(cfg.epochs):
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(epoch, cfg), rel=1e-9)
        opt.step()
        warm.step()
        decay.step()
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(1, cfg) == pytest.approx(0.175)
    assert lr_factor(12, cfg) == 1.0 and lr_factor(95, cfg) == pytest.approx(0.33 ** 2)


def test_lambda_scheduler_is_stepped_per_iteration() -> None:
    cfg = MSFlowConfig(epochs=20, lr=1.0)

    class _Tiny(MSFlow):  # only the optimiser logic, no backbone
        def __init__(self, config: MSFlowConfig) -> None:
            nn.Module.__init__(self)
            self.config = config
            self.w = nn.Parameter(torch.zeros(1))

    opt, sched = _Tiny(cfg).configure_optimizers(steps_per_epoch=3)
    seen = []
    for _ in range(20 * 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # constant within an epoch, and equal to the per-epoch factor
    assert seen == [pytest.approx(lr_factor(i // 3, cfg)) for i in range(60)]


# -- the model ---------------------------------------------------------------------------------------

def test_paper_flow_parameter_counts() -> None:
    """The paper's flows on Wide-ResNet-50 widths (256/512/1024), counted without building the backbone."""
    cfg = MSFlowConfig()
    with torch.device("meta"):
        flows = [parallel_flow(c, n, cfg.clamp, cfg.cond_channels)
                 for c, n in zip((256, 512, 1024), cfg.parallel_blocks)]
        fusion = fusion_flow([256, 512, 1024], clamp=cfg.clamp)
    counts = [sum(p.numel() for p in f.parameters()) for f in flows]
    fusion_count = sum(p.numel() for p in fusion.parameters())
    # per block: conv3x3 (c_in→c_in) + LayerNorm + conv3x3 (c_in→2·C/2) + global affine (2C),
    # with c_in = C/2 + 64
    for c, n, count in zip((256, 512, 1024), cfg.parallel_blocks, counts):
        c_in = c // 2 + 64
        assert count == n * ((9 * c_in + 1) * c_in + 2 * c_in + (9 * c_in + 1) * c + 2 * c)
    assert counts == [1_550_976, 11_993_280, 66_393_600]
    assert fusion_count == 2 * 9_809_184 == 19_618_368
    assert sum(counts) + fusion_count == 99_556_224  # the spec's "99.6 M"


@pytest.mark.slow
def test_paper_preset_built_without_weights() -> None:
    from flowlib.models import build_model

    model = build_model("msflow", "paper", pretrained=False)
    assert model.backbone.channels == [256, 512, 1024] and model.backbone.strides == [4, 8, 16]
    assert model.backbone.padding_mode == "reflect"
    assert model.num_trainable_parameters() == 99_556_224
    assert model.parameter_counts() == {"scale0": 1_550_976, "scale1": 11_993_280, "scale2": 66_393_600,
                                        "fusion": 19_618_368}
    assert model.config.input_size == 512 and model.config.input_size_overrides == {"transistor": 256}
    assert (model.config.batch_size, model.config.lr, model.config.grad_clip, model.config.epochs) == \
        (8, 1e-4, 2.0, 100)


@pytest.fixture(scope="module")
def quick_model():
    from flowlib.models import build_model

    torch.manual_seed(0)
    return build_model("msflow", "quick")


def test_quick_model_shapes_loss_and_scores(quick_model) -> None:
    model = quick_model
    torch.manual_seed(1)
    images = torch.rand(2, 3, 128, 128)
    feats = model.extract(images)
    bb = model.backbone
    assert [tuple(f.shape) for f in feats] == [(2, c, 128 // (2 * s), 128 // (2 * s))
                                              for c, s in zip(bb.channels, bb.strides)]
    zs, log_det = model(feats)
    assert [z.shape for z in zs] == [f.shape for f in feats] and log_det.shape == (2,)
    by_hand = (sum(0.5 * z.pow(2).flatten(1).sum(1) for z in zs) - log_det).mean()
    torch.testing.assert_close(model.loss(feats), by_hand)
    maps, scores = model.predict(feats, (128, 128))
    assert maps.shape == (2, 128, 128) and scores.shape == (2,)
    assert torch.all(maps >= 0) and torch.all(scores >= 0)


def test_scores_come_from_the_fusion_outputs(quick_model) -> None:
    """cool-xuan/msflow#2: scoring the parallel-flow outputs instead of the fusion outputs is a bug."""
    model = quick_model
    torch.manual_seed(2)
    feats = [0.3 * f for f in model.extract(torch.rand(2, 3, 128, 128))]
    out = model.score_maps(feats, (64, 64))
    zs, _ = model(feats)
    loc, det, score = msflow_scores(zs, (64, 64), model.config.top_k)
    torch.testing.assert_close(out["localisation"], loc)
    torch.testing.assert_close(out["score"], score)
    parallel = [flow(f, cond=model.condition(f))[0] for f, flow in zip(feats, model.parallel_flows)]
    assert not torch.allclose(msflow_scores(parallel, (64, 64))[0], loc)


def test_bad_settings_are_rejected() -> None:
    from flowlib.models import build_model

    with pytest.raises(ValueError, match="parallel_blocks"):
        build_model("msflow", "quick", parallel_blocks=(2, 2))
    with pytest.raises(ValueError, match="pool"):
        build_model("msflow", "quick", pool="median")


@pytest.mark.slow
def test_quick_training_detects_and_localises(tmp_path) -> None:
    from flowlib.engine import run

    records = run("msflow", dataset="demo", categories="brick", preset="quick", out=tmp_path,
                  overrides={"epochs": 6, "eval_every": None, "lr_milestones": (5,)}, progress=False,
                  device="cpu")
    metrics = records[0]["metrics"]
    # an untrained flow saturates the detection map (constant image scores, AUROC 0.5); 6 epochs give ~0.98
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.93, metrics
    assert metrics["aupro"] >= 0.85, metrics
