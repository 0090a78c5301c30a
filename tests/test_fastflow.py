"""FastFlow: flow invertibility and log-det, the paper's parameter counts, scoring, and a quick training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flowcheck import jacobian_log_det, randomize

from flowlib.models import build_model, get_config, method_spec
from flowlib.models.fastflow import FastFlow, FastFlowConfig, anomaly_map, fastflow_steps


@pytest.fixture(scope="module")
def quick_model() -> FastFlow:
    torch.manual_seed(0)
    return build_model("fastflow", "quick", pretrained=False)


# --------------------------------------------------------------------------------------------------
# The flow of one feature map
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_flow_is_invertible_with_exact_log_det(conv3x3_only: bool) -> None:
    flow = fastflow_steps(5, flow_steps=4, hidden_ratio=0.6, conv3x3_only=conv3x3_only,
                          generator=torch.Generator().manual_seed(1))
    randomize(flow, 0, add=True).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    z, log_det = flow(x)
    back, log_det_inv = flow(z, reverse=True)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(log_det, jacobian_log_det(lambda v: flow(v)[0], x))


def test_flow_kernel_pattern_and_hidden_width() -> None:
    flow = fastflow_steps(768, flow_steps=20, hidden_ratio=0.16)
    kernels = [block.subnet[0].kernel_size[0] for block in flow.blocks]
    assert kernels == [3, 1] * 10
    first = flow.blocks[0].subnet
    assert (first[0].in_channels, first[0].out_channels, first[2].out_channels) == (384, 61, 768)
    assert all(b.clamp == 2.0 and b.rotation is None for b in flow.blocks)  # tanh clamp 2, hard permutation
    only3 = fastflow_steps(8, flow_steps=8, conv3x3_only=True)
    assert {b.subnet[0].kernel_size[0] for b in only3.blocks} == {3}


def test_flow_permutations_are_seeded() -> None:
    a = fastflow_steps(16, 4, generator=torch.Generator().manual_seed(3))
    b = fastflow_steps(16, 4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x.perm, y.perm) for x, y in zip(a.blocks, b.blocks))
    assert not torch.equal(a.blocks[0].perm, a.blocks[1].perm)


# --------------------------------------------------------------------------------------------------
# Paper presets: trainable parameters, built without weights
# --------------------------------------------------------------------------------------------------
def test_presets_follow_the_papers_settings() -> None:
    spec = method_spec("fastflow")
    assert {"quick", "paper", "paper-resnet18", "paper-wide_resnet50_2", "paper-deit", "paper-cait"} <= set(
        spec.presets)
    for name in ("paper-resnet18", "paper-wide_resnet50_2", "paper-deit", "paper-cait"):
        cfg = get_config("fastflow", name)
        assert (cfg.lr, cfg.weight_decay, cfg.clamp, cfg.epochs, cfg.batch_size) == (1e-3, 1e-5, 2.0, 500, 32)
    assert get_config("fastflow", "paper") == get_config("fastflow", "paper-cait")
    assert get_config("fastflow", "paper-resnet18").conv3x3_only
    assert not get_config("fastflow", "paper-wide_resnet50_2").conv3x3_only


def _within(value: int, expected: float, rel: float = 0.005) -> bool:
    return abs(value - expected) <= rel * expected


def test_resnet18_parameter_count() -> None:
    model = build_model("fastflow", "paper-resnet18", pretrained=False)
    assert model.feature_shapes == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    assert model.num_flow_parameters() == 4_657_408 and _within(model.num_flow_parameters(), 4.66e6)
    assert model.num_norm_parameters() == 917_504 and _within(model.num_norm_parameters(), 0.92e6)
    # 5 574 912 is also what gathierry/FastFlow prints for this setting (gathierry/FastFlow#26)
    assert model.num_trainable_parameters() == 5_574_912
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.slow
def test_wide_resnet50_parameter_count() -> None:
    model = build_model("fastflow", "paper-wide_resnet50_2", pretrained=False)
    assert model.num_flow_parameters() == 41_337_856 and _within(model.num_flow_parameters(), 41.34e6)
    assert model.num_norm_parameters() == 3_670_016 and _within(model.num_norm_parameters(), 3.67e6)


@pytest.mark.parametrize("preset, shape", [("paper-deit", (768, 24, 24)), ("paper-cait", (768, 28, 28))])
def test_transformer_parameter_count(preset: str, shape: tuple[int, int, int]) -> None:
    with torch.device("meta"):  # the transformers are large; shapes and counts need no memory
        model = build_model("fastflow", preset, pretrained=False)
    assert model.feature_shapes == [shape]
    assert model.num_flow_parameters() == 7_074_500 and _within(model.num_flow_parameters(), 7.07e6)
    assert model.num_norm_parameters() == 0
    assert model.num_trainable_parameters() == 7_074_500


# --------------------------------------------------------------------------------------------------
# The model: shapes, loss, scoring
# --------------------------------------------------------------------------------------------------
def test_forward_shapes_and_raw_features(quick_model: FastFlow) -> None:
    cfg = quick_model.config
    images = torch.rand(2, 3, cfg.input_size, cfg.input_size)
    feats = quick_model.extract(images)
    assert [tuple(f.shape[1:]) for f in feats] == quick_model.feature_shapes
    # extract returns the backbone output *before* the trainable LayerNorm (cached features stay valid)
    assert all(torch.equal(a, b) for a, b in zip(feats, quick_model.backbone(images)))
    assert all(not p.requires_grad for p in quick_model.backbone.parameters())
    assert all(p.requires_grad for p in quick_model.norms.parameters())
    zs, log_det = quick_model(feats)
    assert [z.shape for z in zs] == [f.shape for f in feats]
    assert log_det.shape == (2,)


def test_loss_is_the_sum_over_scales_of_the_batch_mean_nll(quick_model: FastFlow) -> None:
    cfg = quick_model.config
    feats = quick_model.extract(torch.rand(3, 3, cfg.input_size, cfg.input_size))
    expected = 0.0
    for x, norm, flow in zip(feats, quick_model.norms, quick_model.flows):
        z, ld = flow(norm(x))
        expected = expected + (0.5 * z.pow(2).sum(dim=(1, 2, 3)) - ld).mean()
    torch.testing.assert_close(quick_model.loss(feats), expected)


def test_anomaly_map_on_hand_made_latents() -> None:
    size = (8, 8)
    zero = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 6, 2, 2)]
    torch.testing.assert_close(anomaly_map(zero, size), -torch.ones(1, *size))  # z = 0: the mode, −1
    # one scale far out at one position: the map rises there, by half (mean over two scales)
    odd = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 6, 2, 2)]
    odd[0][0, :, 1, 2] = 30.0
    m = anomaly_map(odd, size)[0]
    assert m.max() > -0.75 and m.min() == -1.0
    r, c = divmod(int(m.argmax()), size[1])
    assert (r // 2, c // 2) == (1, 2)  # at the upsampled location of the odd position
    # the map depends on the channel mean of z², not on the sign
    pos = [torch.full((1, 3, 2, 2), 1.5)]
    torch.testing.assert_close(anomaly_map(pos, (2, 2)), anomaly_map([-pos[0]], (2, 2)))
    torch.testing.assert_close(anomaly_map(pos, (2, 2)), torch.full((1, 2, 2), -float(np.exp(-1.125))))
    with pytest.raises(ValueError, match="at least one"):
        anomaly_map([], size)


def test_predict_maps_and_scores(quick_model: FastFlow) -> None:
    cfg = quick_model.config
    feats = quick_model.extract(torch.rand(2, 3, cfg.input_size, cfg.input_size))
    maps, scores = quick_model.predict(feats, (40, 50))
    assert maps.shape == (2, 40, 50) and scores.shape == (2,)
    assert float(maps.min()) >= -1.0 and float(maps.max()) <= 0.0
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))  # image score = max of the map


def test_wrong_feature_size_gives_a_clear_error(quick_model: FastFlow) -> None:
    size = quick_model.config.input_size // 2
    feats = quick_model.extract(torch.rand(1, 3, size, size))
    with pytest.raises(ValueError, match="input_size"):
        quick_model.loss(feats)
    with pytest.raises(ValueError, match="feature maps"):
        quick_model.loss(feats[:1])


def test_model_pickles_whole(quick_model: FastFlow, tmp_path) -> None:
    cfg = quick_model.config
    feats = quick_model.extract(torch.rand(1, 3, cfg.input_size, cfg.input_size))
    expected = quick_model.predict(feats, (16, 16))[0]
    path = tmp_path / "fastflow.pt"
    torch.save(quick_model, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded.predict(feats, (16, 16))[0], expected)
    clone = pickle.loads(pickle.dumps(quick_model))
    assert isinstance(clone, FastFlow) and isinstance(clone.config, FastFlowConfig)


def test_head_state_dict_round_trip(quick_model: FastFlow) -> None:
    state = quick_model.head_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert any(k.endswith(".perm") for k in state)  # the fixed permutations travel with the weights
    fresh = build_model("fastflow", "quick", pretrained=False, flow_seed=123)
    fresh.load_state_dict(state, strict=False)
    cfg = quick_model.config
    feats = quick_model.extract(torch.rand(1, 3, cfg.input_size, cfg.input_size))
    torch.testing.assert_close(fresh.predict(feats, (8, 8))[0], quick_model.predict(feats, (8, 8))[0])


# --------------------------------------------------------------------------------------------------
# Quick training on the built-in data
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_training_lowers_the_loss_and_finds_the_defects(tmp_path) -> None:
    from flowlib.engine import run

    # the object category with half the quick schedule keeps this under a minute on two cores
    (record,) = run("fastflow", dataset="demo", categories="coffee", preset="quick", seed=0, out=tmp_path,
                    overrides={"epochs": 10}, progress=False)
    losses = [h["loss"] for h in record["history"]]
    assert losses[-1] < losses[0] - 10_000, losses  # nats per image; starts near ½ · 69 632 dimensions
    assert record["metrics"]["image_auroc"] >= 0.9, record["metrics"]
    assert record["metrics"]["pixel_auroc"] >= 0.9, record["metrics"]
    assert record["timing"]["trainable_parameters"] == 567_840
