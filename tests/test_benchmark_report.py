"""``benchmarks/run.py``: what a merged report shows, and what the FLOP count includes.

The timings themselves are not tested (they depend on the machine); what is tested is the bookkeeping
that decides which rows and notes a merged report shows, since a stale failure or a stale number in a
published table misleads its readers, and which products count as a model's FLOPs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flowlib_bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(results, log, command, started):
    return {
        "command": command, "started": started, "finished": started,
        "machine": {"cpu_model": "test CPU", "usable_cores": 2, "logical_cores": 2, "memory_gb": 1.0,
                    "python": "3", "torch": "2", "device": "cpu"},
        "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [1.0, 1.0, 1.0],
        "settings": {"methods": ["fastflow"], "threads": 1, "reps": 5, "paper_reps": 2, "peer_train_batch": 8,
                     "throughput_batch": 16},
        "anomalib_version": "2.7.0", "results": results, "peers": [], "equivalence": None, "log": log,
    }


def _peer(side, seconds, kind="infer", batch=1):
    return {"side": side, "method": "fastflow", "group": "peer:fastflow", "kind": kind, "batch": batch,
            "total": {"median_s": seconds, "cpu_median_s": seconds}}


def _failed(side, kind="infer", batch=1):
    return {"error": "AttributeError: boom", "spec": {"side": side, "method": "fastflow",
                                                      "group": "peer:fastflow", "kind": kind, "batch": batch}}


def test_a_later_success_replaces_an_earlier_failure_and_its_note(bench):
    other = {**_peer("anomalib", 1.0), "method": "csflow", "group": "peer:csflow"}
    old = _report([other, _failed("anomalib"), _peer("flowlib", 0.2)],
                  ["planned two rounds", "FAILED anomalib:fastflow/-/infer/b1: AttributeError: boom"],
                  "run.py --methods fastflow", "2026-01-01")
    new = _report([_peer("anomalib", 0.4), _peer("flowlib", 0.3)], ["planned one round"],
                  "run.py --methods fastflow --merge", "2026-01-02")
    merged = bench.merge_reports(old, new)

    assert not any("error" in r for r in merged["results"]), "the superseded failure is still reported"
    assert other in merged["results"], "a measurement the new run did not repeat was lost"
    fastflow = [r for r in merged["results"] if r.get("group") == "peer:fastflow"]
    assert [r["total"]["median_s"] for r in fastflow] == [0.4, 0.3]
    assert merged["log"] == ["planned one round"]
    assert merged["previous_runs"][-1]["log"] == old["log"]  # kept in the JSON, not shown
    assert merged["peers"][0]["ratio"] == pytest.approx(0.3 / 0.4)
    text = bench.markdown(merged)
    assert "FAILED" not in text and "planned one round" in text


def test_a_new_failure_keeps_the_last_good_result_and_is_listed(bench):
    good = _peer("anomalib", 0.5, batch=16)
    failed = {"error": "timed out after 900 s", "spec": {k: v for k, v in good.items() if k != "total"}}
    merged = bench.merge_reports(_report([good], [], "a", "2026-01-01"),
                                 _report([failed], [], "b", "2026-01-02"))
    assert good in merged["results"] and failed in merged["results"]
    assert bench._result_key(failed) == bench._result_key(good)  # a success later on replaces both
    assert "- FAILED anomalib:fastflow/-/infer/b16: timed out after 900 s" in bench.markdown(merged)


def test_the_benchmark_counts_no_flops_for_the_resize_products(bench) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from flowlib.models import build_model
    from flowlib.resize import BilinearResize, resize_sum

    maps = [torch.ones(2, 32, 32), torch.ones(2, 8, 8)]
    counter = FlopCounterMode(display=False)
    with counter:
        resize_sum(maps, (64, 64), align_corners=True)
    assert counter.get_total_flops() > 0  # the products are real and FlopCounterMode sees them...
    assert set(counter.get_flop_counts()) == {"Global", BilinearResize.__name__}
    assert bench.count_flops(lambda: resize_sum(maps, (64, 64), True))[1] == 0  # ...under their own name

    # MSFlow's scoring has no product of its own: its head counts exactly the flow's FLOPs
    model = build_model("msflow", "quick", pretrained=False, input_size=64).eval()
    feats = model.extract(torch.rand(2, 3, 64, 64))
    with torch.inference_mode():
        _, flow_flops = bench.count_flops(lambda: model(feats))
        _, head_flops = bench.count_flops(lambda: model.predict(feats, (64, 64)))
    assert head_flops == flow_flops > 0


@pytest.mark.parametrize("skip", [False, True])
def test_paper_presets_are_timed_at_batch_16_on_a_cpu_unless_skipped(bench, skip) -> None:
    argv = ["--methods", "msflow", "--presets", "quick, paper", "--device", "cpu", "--compiled", "",
            "--skip-paper-training", "--epoch-category", ""] + (["--skip-paper-throughput"] if skip else [])
    args = bench.build_parser().parse_args(argv)
    assert (args.methods, args.presets, args.compiled) == (["msflow"], ["quick", "paper"], [])
    log: list[str] = []
    specs = bench.plan_flowlib(args, log)
    batches = {(s["preset"], s["batch"]) for s in specs if s["kind"] == "infer"}
    assert ("quick", 1) in batches and ("quick", 16) in batches and ("paper", 1) in batches
    assert (("paper", 16) in batches) is not skip
    assert not log


def test_the_inference_table_names_the_throughput_batch_it_was_run_with(bench) -> None:
    report = _report([], [], "run.py --throughput-batch 8", "2026-01-01")
    report["settings"]["throughput_batch"] = 8
    text = bench.markdown(report)
    assert "| batch 8: img/s |" in text and "peak mem MB b1 / b8 |" in text
    assert "batch 16" not in text


def test_compiled_training_is_planned_at_the_training_batch_and_kinds_filter_the_plan(bench) -> None:
    from flowlib.models import get_config

    argv = ["--methods", "hgad", "--presets", "quick,paper", "--device", "cpu", "--compiled-training",
            "quick,paper", "--kinds", "train_compiled"]
    args = bench.build_parser().parse_args(argv)
    specs = bench.plan_flowlib(args, [])
    assert [(s["kind"], s["preset"], s["batch"]) for s in specs] == [
        ("train_compiled", "quick", int(get_config("hgad", "quick").batch_size)),
        ("train_compiled", "paper", 1)]  # the paper presets train at batch 1 on a CPU
    args = bench.build_parser().parse_args(argv + ["--skip-paper-training"])
    assert [s["preset"] for s in bench.plan_flowlib(args, [])] == ["quick"]
    args = bench.build_parser().parse_args(argv[:-2] + ["--compiled-training", ""])
    assert "train_compiled" not in {s["kind"] for s in bench.plan_flowlib(args, [])}


def test_an_unknown_kind_is_refused_with_the_choices(bench, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--kinds", "train_compile", "--no-peers"])
    err = capsys.readouterr().err
    assert "--kinds: unknown train_compile" in err and "train_compiled" in err


def test_the_compiled_training_table_shows_each_row(bench) -> None:
    row = {"side": "flowlib", "method": "msflow", "preset": "quick", "kind": "train_compiled", "batch": 4,
           "eager": {"median_s": 0.0532}, "compiled": {"median_s": 0.0441}, "speedup": 1.21,
           "compile_s": 71.6, "losses": {"eager": [3.0] * 6, "compiled": [3.0] * 6},
           "max_rel_loss_diff": 2.5e-7}
    text = bench.markdown(_report([row], [], "run.py", "2026-01-01"))
    assert "## Compiled training steps" in text
    assert "| msflow | quick | 4 | 53.2 | 44.1 | **1.21×** | 72 | 6 | 2.5e-07 |" in text


def test_the_compiled_training_worker_runs_both_sides_on_equal_terms(bench, monkeypatch) -> None:
    """With ``torch.compile`` replaced by the identity the two sides are the same computation, so their
    losses must agree exactly: the copies start from the same weights, keep separate optimisers, and draw
    the same random positions at their i-th step."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    spec = {"method": "hgad", "preset": "quick", "kind": "train_compiled", "batch": 2, "reps": 2,
            "overrides": {"input_size": 64, "positions_per_step": 5}}  # random positions at every step
    r = bench.compiled_training(spec, torch.device("cpu"))
    assert r["kind"] == "train_compiled" and r["batch"] == 2
    assert len(r["losses"]["eager"]) == len(r["losses"]["compiled"]) == 3  # the first step and 2 pairs
    assert r["losses"]["eager"] == r["losses"]["compiled"] and r["max_rel_loss_diff"] == 0.0
    assert len(set(r["losses"]["eager"])) == 3  # the weights moved: three different losses
    assert r["eager"]["reps"] == r["compiled"]["reps"] == 2 and r["speedup"] > 0 and r["compile_s"] > 0
