"""The shared engine, results, checkpoints and command line, end to end with the reference method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowlib import engine
from flowlib.__main__ import main as cli
from flowlib.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from flowlib.models import build_model, get_config
from flowlib.results import category_table, load_results, metrics_table


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    ckpt = tmp_path_factory.mktemp("ckpt")
    records = engine.run("gaussian", dataset="demo", categories="coffee", preset="quick", seed=0, out=out,
                         checkpoint_dir=ckpt, progress=False, keep_results=True)
    return out, ckpt, records


def test_run_writes_one_json_per_category_with_device_time_and_config(gaussian_run):
    out, _, records = gaussian_run
    assert len(records) == 1
    saved = json.loads(open(records[0]["_path"]).read())
    assert saved["method"] == "gaussian" and saved["category"] == "coffee" and saved["preset"] == "quick"
    assert saved["device"].startswith("cpu")
    assert saved["timing"]["train_seconds_total"] > 0
    assert saved["config"]["backbone"] == "efficientnet_lite0"
    assert set(saved["metrics"]) >= {"image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"}


def test_reference_method_detects_demo_defects(gaussian_run):
    metrics = gaussian_run[2][0]["metrics"]
    # a random scorer sits near 0.5; a per-position Gaussian on pretrained features does far better
    assert metrics["image_auroc"] > 0.75, metrics
    assert metrics["pixel_auroc"] > 0.8, metrics


def test_eval_result_has_maps_for_every_test_image(gaussian_run):
    result = gaussian_run[2][0]["eval"]
    n = len(result.labels)
    assert result.maps.shape == (n, 128, 128) and result.scores.shape == (n,)
    assert result.masks.shape == result.maps.shape
    assert int(result.labels.sum()) == sum(int(m.any()) for m in result.masks)


def test_tables_from_results(gaussian_run):
    out = gaussian_run[0]
    records = load_results(out)
    table = category_table(records, "image_auroc")
    assert "| Image AUROC | Average | coffee |" in table and "Ours: gaussian" in table
    auroc = records[0]["metrics"]["image_auroc"]
    assert f"{100 * auroc:.1f}" in table
    assert "**mean**" in metrics_table(records)


def test_checkpoint_round_trip_gives_identical_maps(gaussian_run, tmp_path):
    _, ckpt, records = gaussian_run
    path = next(ckpt.rglob("*.pt"))
    model, extra = load_checkpoint(path)
    assert extra["categories"] == ["coffee"] and "image_threshold" in extra
    x = torch.rand(2, 3, 128, 128)
    maps1, scores1 = model.predict(model.extract(x), (128, 128))
    model2, _ = load_checkpoint(path)
    maps2, _ = model2.predict(model2.extract(x), (128, 128))
    assert torch.equal(maps1, maps2)


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "flowlib-checkpoint-v1", "payload": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model("gaussian", "quick")
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_non_finite_loss_is_a_clear_error():
    model = build_model("gaussian", "quick", epochs=1)
    with torch.no_grad():
        model.log_std[0].fill_(float("nan"))
    feats = [torch.randn(4, c, 128 // s, 128 // s) for c, s in zip(model.backbone.channels,
                                                                    model.backbone.strides)]
    fs = engine.FeatureSet(feats, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                           torch.zeros(4, 128, 128, dtype=torch.uint8))
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1, step 0.*lower learning rate"):
        engine.fit(model, fs, progress=False)


def test_unknown_setting_and_category_are_named():
    with pytest.raises(ValueError, match="epochz"):
        get_config("gaussian", "quick", epochz=3)
    with pytest.raises(ValueError, match="Unknown demo categories \\['nope'\\]"):
        engine.run("gaussian", dataset="demo", categories="nope", progress=False)


def test_cli_table_and_predict(gaussian_run, tmp_path, capsys):
    out, ckpt, _ = gaussian_run
    assert cli(["table", str(out)]) == 0
    assert "Ours: gaussian" in capsys.readouterr().out
    from flowlib.data import load_dataset

    sample = load_dataset("demo", "coffee", "test", image_size=128)[0]
    assert cli(["predict", str(next(ckpt.rglob("*.pt"))), sample["path"], "--out", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores) == 1 and np.isfinite(scores[0]["score"]) and "defective" in scores[0]
    stem = scores[0]["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
    assert np.load(tmp_path / f"{stem}_map.npy").shape == (128, 128)
    assert (tmp_path / f"{stem}_overlay.png").stat().st_size > 0


def test_examples_keep_fixed_images_and_their_maps(gaussian_run):
    from flowlib.results import load_examples, pick_examples

    record = gaussian_run[2][0]
    result = record["eval"]
    ex = load_examples(record)
    idx = pick_examples(result.labels.tolist(), result.defects)
    assert ex["labels"].tolist() == result.labels[idx].tolist() == [0] + [1] * (len(idx) - 1)
    assert list(ex["paths"]) == [str(Path(result.paths[i]).resolve()) for i in idx]
    assert len(set(ex["defects"][1:])) == len(idx) - 1, "the defective examples are of different kinds"
    # the stored maps are the evaluation maps, downsampled: their means agree
    full = result.maps[idx].mean(dim=(1, 2)).numpy()
    assert np.allclose(ex["maps"].mean(axis=(1, 2)), full, rtol=1e-2)
    assert ex["lo"] == pytest.approx(float(result.maps.min()))
    assert ex["hi"] == pytest.approx(float(result.maps.max()))
    assert np.array_equal(ex["masks"].any(axis=(1, 2)), ex["labels"] == 1)


def test_pick_examples_prefers_one_image_per_defect_kind():
    from flowlib.results import pick_examples

    labels = [1, 1, 0, 1, 0, 1]
    defects = ["hole", "hole", "good", "stain", "good", "scratch"]
    assert pick_examples(labels, defects) == [2, 0, 3, 5]
    assert pick_examples(labels, defects, n_defective=4) == [2, 0, 3, 5, 1]


def test_comparison_table_counts_a_unified_training_once():
    from flowlib.results import comparison_table

    def rec(method, cat, seconds, n, auroc):
        return {"method": method, "category": cat,
                "metrics": {"image_auroc": auroc, "pixel_auroc": 0.5, "aupro": 0.5, "image_f1": 0.5,
                            "pixel_f1": 0.5},
                "timing": {"train_seconds_total": seconds, "train_categories": n,
                           "inference_ms_per_image": 2.0, "trainable_parameters": 1_500_000}}

    table = comparison_table([rec("a", "x", 10.0, 1, 0.9), rec("a", "y", 20.0, 1, 0.7),
                              rec("u", "x", 50.0, 2, 0.8), rec("u", "y", 50.0, 2, 0.6)])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| 80.0 |" in rows["a"] and "1.50 M × 2 | 30 | 2.0 |" in rows["a"]
    assert "| 70.0 |" in rows["u"] and "1.50 M × 1 | 50 | 2.0 |" in rows["u"]


def test_ensure_results_reuses_fresh_results_and_retrains_stale_ones(gaussian_run, monkeypatch):
    out, _, records = gaussian_run
    calls = []
    monkeypatch.setattr(engine, "run", lambda *a, **k: calls.append(k) or ["trained"])
    reused, trained = engine.ensure_results("gaussian", categories="coffee", out=out, progress=False)
    assert not trained and not calls and reused[0]["_path"] == records[0]["_path"]
    # a result made with other settings than the current preset's is stale
    path = Path(records[0]["_path"])
    saved = json.loads(path.read_text())
    stale = dict(saved, config=dict(saved["config"], epochs=saved["config"]["epochs"] + 1), seed=7)
    (path.parent / "quick_seed7.json").write_text(json.dumps(stale))
    again = engine.ensure_results("gaussian", categories="coffee", seed=7, out=out, progress=False)
    assert again == (["trained"], True)
    # and a missing category is trained
    assert engine.ensure_results("gaussian", categories="coffee,brick", out=out, progress=False)[1]


def test_asking_for_a_cuda_device_the_machine_lacks_says_so(monkeypatch):
    from flowlib.config import get_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert get_device(None) == torch.device("cpu") and get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda' asks for CUDA, but torch sees no CUDA device.*Use 'cpu'"):
        get_device("cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        engine.run("gaussian", dataset="demo", categories="coffee", device="cuda", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert get_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="'cuda:2': this machine has 2 CUDA device"):
        get_device("cuda:2")
