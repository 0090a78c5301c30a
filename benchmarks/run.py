"""Speed, memory and FLOPs of every flowlib method, and of anomalib's FastFlow and CS-Flow beside them.

Usage (from the repository root; ``make bench`` runs the first line)::

    .venv/bin/python benchmarks/run.py                                  # everything, CPU
    .venv/bin/python benchmarks/run.py --methods fastflow --presets quick --no-peers
    .venv/bin/python benchmarks/run.py --device cuda --threads 0        # on a GPU machine

What is measured, per method and preset (the models are built with ``pretrained=False``: speed does
not depend on the weights, and nothing has to be downloaded):

* ``infer``: inference latency per image at batch 1, and throughput at batch 16, split into the frozen
  backbone (``model.extract``) and the flow head with its scoring (``model.predict``);
* ``train_live``: training images/s when every step runs the backbone (``extract`` + ``loss`` +
  backward + optimiser step), and ``train_cached``: the same step on features computed beforehand
  (what :func:`flowlib.engine.fit` does with ``cache_features=True``);
* ``epoch`` (quick presets): one training epoch of :func:`flowlib.engine.fit` on a category of the
  built-in data, images read from disk and run through the backbone every epoch (``cache_features=False``)
  against the same epoch on features cached once (the one-off caching pass is timed separately);
* ``train_compiled`` (``--compiled-training``, quick presets by default): the training step on cached
  features with a ``torch.compile``-d loss against the eager one, steps alternated, and the compile time;
* ``infer_compiled`` (``--compiled``, quick presets by default): batch-1 inference with
  ``model.compile_inference()`` against the eager model, calls alternated, and the compile time;
* FLOPs (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, 2 per
  multiply-add) of the backbone and of the head, and the FLOP/s each part achieves;
* peak memory: growth of the resident set during the measurement (CPU), or the CUDA allocator's peak.

Each measurement runs in a fresh process (so peak memory is its own), with one warm-up call, which is
also the one whose FLOPs are counted, then ``--reps`` timed calls; the median is reported.

The paper presets are built at their real input size; on a CPU their inference is timed at batch 1 and at
``--throughput-batch`` (``--skip-paper-throughput``: batch 1 only), their training at batch 1, with
``--paper-reps`` repetitions (``--skip-paper-training`` leaves out their training steps).

Peers: anomalib's FastFlow (ResNet-18, 256 px) and CS-Flow (EfficientNet-B5, 256 px) run in their own
virtual environment (``benchmarks/.venv-anomalib``, see the README) through ``anomalib_peers.py``, on
the same images and batch sizes as flowlib's matching configuration; the report gives time ratios
flowlib / anomalib (below 1 = flowlib faster). For FastFlow it also loads anomalib's weights into
flowlib's model and compares the anomaly maps and the loss.

Results: ``--out`` (default ``benchmarks/results``) gets ``bench_<device>.json`` and ``bench_<device>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from timing import (  # noqa: E402
    PeakMemory,
    count_flops,
    emit,
    load_average,
    machine_info,
    measure_inference,
    measure_training,
    parse_result,
    set_threads,
    split_laps,
    stamp,
    summary,
    training_step,
)

DEFAULT_METHODS = ("fastflow", "csflow", "msflow", "hgad")
FLOWLIB_KINDS = ("infer", "infer_compiled", "train_live", "train_cached", "train_compiled", "epoch")
ANOMALIB_PYTHON = HERE / ".venv-anomalib" / "bin" / "python"

#: flowlib's configuration that does the same computation as anomalib's default model, and anomalib's
#: constructor arguments. Batch 8 for training is the reference measurement quoted in the README.
# Both sides of a pair time inference under the same autograd mode. anomalib's FastFlow fails under
# torch.inference_mode() here (its flow asks autograd for a grad_fn), so that pair uses no_grad.
PEERS: dict[str, dict[str, Any]] = {
    "fastflow": {
        "ours": {"method": "fastflow", "preset": "paper-resnet18", "overrides": {"conv3x3_only": False},
                 "grad_mode": "no_grad"},
        "anomalib": {"method": "fastflow", "backbone": "resnet18", "input_size": 256, "flow_steps": 8,
                     "conv3x3_only": False, "hidden_ratio": 1.0, "grad_mode": "no_grad"},
        "label": "FastFlow, ResNet-18, 256 px, 8 steps, 3×3/1×1 subnets",
    },
    "csflow": {
        "ours": {"method": "csflow", "preset": "paper-256", "overrides": {}},
        "anomalib": {"method": "csflow", "input_size": 256, "hidden": 1024, "n_coupling_blocks": 4,
                     "clamp": 3},
        "label": "CS-Flow, EfficientNet-B5 (blocks.5), 256 px pyramid, 4 blocks, hidden 1024",
    },
}


# ----------------------------------------------------------------------------------------------------
# Worker: one measurement of one flowlib model, in its own process
# ----------------------------------------------------------------------------------------------------

def _build(spec: dict[str, Any], device: torch.device):
    from flowlib.config import seed_everything
    from flowlib.models import build_model

    seed_everything(int(spec.get("seed", 0)))
    overrides = {"pretrained": False, **spec.get("overrides", {})}
    model = build_model(spec["method"], spec["preset"], **overrides)
    return model.to(device)


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    # the same generator and seed as anomalib_peers.py, so both sides see the same pixels
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _describe(model: Any) -> dict[str, Any]:
    cfg = model.config
    backbone = getattr(model, "backbone", None)
    return {"backbone_name": cfg.backbone, "input_size": int(cfg.input_size),
            "trainable_parameters": model.num_trainable_parameters(),
            "backbone_parameters": sum(p.numel() for p in backbone.parameters()) if backbone else 0,
            "config_batch_size": int(cfg.batch_size)}


def _training_step(model: Any, loss_fn: Any, class_ids: torch.Tensor, steps: int) -> Any:
    """:func:`timing.training_step` for a flowlib model: its ``loss_fn`` (``model.loss`` or a compiled
    one), its own optimiser and scheduler (a schedule of at least ``steps`` steps) and gradient clipping."""
    optimizer, scheduler = model.configure_optimizers(max(steps, 10))
    return training_step(lambda feats: loss_fn(feats, class_ids), optimizer, model.trainable_parameters(),
                         model.config.grad_clip, scheduler)


@contextlib.contextmanager
def _empty_compiler_cache() -> Any:
    """An empty, temporary compiler cache for the block, so that a compile time is what a first run pays
    (a warm cache cuts it several-fold)."""
    with tempfile.TemporaryDirectory(prefix="flowlib-bench-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement of a flowlib model: a kind of :data:`FLOWLIB_KINDS`, or ``equivalence``."""
    set_threads(spec.get("threads"))
    device = torch.device(spec.get("device", "cpu"))
    if spec["kind"] == "equivalence":
        return fastflow_equivalence(spec, device)
    if spec["kind"] == "epoch":
        return epoch_times(spec, device)
    if spec["kind"] == "infer_compiled":
        return compiled_inference(spec, device)
    if spec["kind"] == "train_compiled":
        return compiled_training(spec, device)
    model = _build(spec, device)
    size, batch, reps = int(model.config.input_size), int(spec["batch"]), int(spec.get("reps", 3))
    x = _images(batch, size, int(spec.get("input_seed", 1234))).to(device)
    class_ids = torch.zeros(batch, dtype=torch.long, device=device)
    result: dict[str, Any] = {"side": "flowlib", "method": spec["method"], "preset": spec["preset"],
                              "kind": spec["kind"], "batch": batch, "device": str(device), **_describe(model)}
    if spec["kind"] == "infer":
        model.eval()
        result.update(measure_inference(lambda: model.extract(x),
                                        lambda f: model.predict(f, (size, size), class_ids),
                                        spec, batch, reps, device))
        return result
    if spec["kind"] in ("train_live", "train_cached"):
        live = spec["kind"] == "train_live"
        model.train()
        step = _training_step(model, model.loss, class_ids, reps + 1)
        cached = None if live else [f.detach() for f in model.extract(x)]
        result.update(measure_training(lambda: model.extract(x), step, cached, batch, reps, device))
        return result
    raise ValueError(f"Unknown measurement kind {spec['kind']!r}.")


def compiled_inference(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Inference of the eager and the ``torch.compile``-d model (``compile_inference``), calls alternated.

    One model; its eager ``extract``/``predict`` are kept before compiling. The first compiled call
    (compilation) is timed on its own. Then each repetition times one eager and one compiled call, so
    a change in the machine's speed hits both; the ratio is the median of the per-repetition ratios.
    Also reports how far the compiled maps and scores are from the eager ones. The compiler's cache
    starts empty (a temporary folder, removed afterwards).
    """
    model = _build(spec, device).eval()
    size, batch, reps = int(model.config.input_size), int(spec["batch"]), int(spec.get("reps", 3))
    x = _images(batch, size, int(spec.get("input_seed", 1234))).to(device)
    class_ids = torch.zeros(batch, dtype=torch.long, device=device)
    eager = (model.extract, model.predict)
    model.compile_inference()
    sides = {"eager": eager, "compiled": (model.extract, model.predict)}

    def lap(extract: Any, predict: Any) -> dict[str, tuple[float, float]]:
        """``{part: (wall, cpu)}`` seconds of one ``predict(extract(x))``."""
        laps = split_laps(lambda: extract(x), lambda f: predict(f, (size, size), class_ids), 1, device)
        return {part: (wall[0], cpu[0]) for part, (wall, cpu) in laps.items()}

    runs: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in sides}
    with _empty_compiler_cache(), torch.inference_mode():
        feats, bb_flops = count_flops(lambda: eager[0](x))
        (maps, scores), head_flops = count_flops(lambda: eager[1](feats, (size, size), class_ids))
        w0, _ = stamp(device)
        maps_c, scores_c = sides["compiled"][1](sides["compiled"][0](x), (size, size), class_ids)
        w1, _ = stamp(device)
        for _ in range(reps):
            for name, (extract, predict) in sides.items():  # eager, then compiled
                runs[name].append(lap(extract, predict))
    out: dict[str, Any] = {"side": "flowlib", "method": spec["method"], "preset": spec["preset"],
                           "kind": "infer_compiled", "batch": batch, "device": str(device),
                           **_describe(model), "compile_s": w1 - w0,
                           "flops": {"backbone": bb_flops, "head": head_flops,
                                     "total": bb_flops + head_flops},
                           "max_rel_diff_maps": float((maps_c - maps).abs().max()
                                                      / maps.abs().max().clamp_min(1e-30)),
                           "max_abs_diff_scores": float((scores_c - scores).abs().max())}
    parts = ("backbone", "head", "total")
    for name, laps in runs.items():
        out[name] = {part: summary([lp[part][0] for lp in laps], [lp[part][1] for lp in laps])
                     for part in parts}
    pairs = list(zip(runs["eager"], runs["compiled"]))
    out["speedup"] = {part: statistics.median(e[part][0] / c[part][0] for e, c in pairs) for part in parts}
    return out


def compiled_training(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Training steps on cached features with the eager and the ``torch.compile``-d loss, steps alternated.

    Two copies of one model (same weights), each with its own optimiser; the copy's ``loss`` is compiled
    with ``torch.compile``'s defaults (its backward goes through the compiler too). The first step of each
    side is timed on its own: the compiled one compiles, in an empty compiler cache. Then each repetition
    times one eager and one compiled step, so a change in the machine's speed hits both; the speed-up is
    the median of the per-repetition ratios. Both sides take the same steps on the same batch, with the
    global random generator seeded alike before each side's i-th step, so their losses differ by rounding
    only: the largest relative difference over all steps is reported.
    """
    model = _build(spec, device).train()
    twin = copy.deepcopy(model)
    size, batch, reps = int(model.config.input_size), int(spec["batch"]), int(spec.get("reps", 3))
    x = _images(batch, size, int(spec.get("input_seed", 1234))).to(device)
    class_ids = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        feats = [f.detach() for f in model.extract(x)]
    sides = {"eager": _training_step(model, model.loss, class_ids, reps + 1),
             "compiled": _training_step(twin, torch.compile(twin.loss), class_ids, reps + 1)}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}

    def timed(name: str) -> tuple[float, float]:
        # the i-th step of either side draws the same random numbers (HGAD trains on random positions)
        torch.manual_seed(int(spec.get("seed", 0)) + 1 + len(losses[name]))
        w0, c0 = stamp(device)
        losses[name].append(float(sides[name](feats)))
        w1, c1 = stamp(device)
        return w1 - w0, c1 - c0

    with _empty_compiler_cache():
        first = {name: timed(name)[0] for name in sides}  # eager, then compiled (compiling)
        for _ in range(reps):
            for name in sides:
                wall, cpu = timed(name)
                times[name][0].append(wall)
                times[name][1].append(cpu)
    pairs = zip(times["eager"][0], times["compiled"][0])
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(losses["eager"], losses["compiled"])]
    return {"side": "flowlib", "method": spec["method"], "preset": spec["preset"], "kind": "train_compiled",
            "batch": batch, "device": str(device), **_describe(model),
            "first_eager_s": first["eager"], "compile_s": first["compiled"],
            "eager": summary(*times["eager"]), "compiled": summary(*times["compiled"]),
            "speedup": statistics.median(e / c for e, c in pairs),
            "losses": losses, "max_rel_loss_diff": max(rel)}


def epoch_times(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Seconds per training epoch of ``engine.fit`` on one built-in category, live and on cached features.

    Two models are built from the same seed, one with ``cache_features=False`` (every epoch reads and
    resizes the images and runs the backbone) and one with ``cache_features=True`` (the backbone runs
    once, in a timed caching pass, and the epochs replay its features). Each timed call is
    ``fit(..., epochs=1)`` with the same seed, so both sides see the same batches; the first-epoch
    losses of the two sides are reported (equal up to float rounding: ``tests/test_feature_cache.py``).
    """
    from flowlib.config import seed_everything
    from flowlib.data import load_dataset
    from flowlib.engine import extract_features, fit

    reps = int(spec.get("reps", 3))

    def build(cache: bool) -> Any:
        return _build({**spec, "overrides": {**spec.get("overrides", {}), "cache_features": cache}}, device)

    live_model = build(False)
    cfg = live_model.config
    train = load_dataset("demo", spec["category"], "train", image_size=cfg.input_size)
    batch = int(cfg.batch_size)

    def epochs(model: Any, data: Any) -> tuple[list[float], list[float], list[float]]:
        losses, wall, cpu = [], [], []
        for _ in range(reps):
            seed_everything(0)  # the losses that sample (HGAD's positions) draw the same numbers
            w0, c0 = stamp(device)
            history = fit(model, data, epochs=1, batch_size=batch, device=device, seed=0, progress=False)
            w1, c1 = stamp(device)
            losses.append(history[0]["loss"])
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
        return losses, wall, cpu

    with PeakMemory(device) as mem_live:
        live_losses, live_wall, live_cpu = epochs(live_model, train)
    cached_model = build(True)
    with PeakMemory(device) as mem_cached:
        w0, c0 = stamp(device)
        features = extract_features(cached_model, train, batch, device, progress=False)
        w1, c1 = stamp(device)
        cached_losses, cached_wall, cached_cpu = epochs(cached_model, features)
    live, cached = summary(live_wall, live_cpu), summary(cached_wall, cached_cpu)
    return {"side": "flowlib", "method": spec["method"], "preset": spec["preset"], "kind": "epoch",
            "batch": batch, "device": str(device), "category": spec["category"], "images": len(train),
            **_describe(live_model), "live": live, "cached": cached,
            "caching": {"median_s": w1 - w0, "cpu_median_s": c1 - c0},
            "speedup": live["median_s"] / cached["median_s"],
            "speedup_cpu_time": live["cpu_median_s"] / cached["cpu_median_s"],
            "first_epoch_loss": {"live": live_losses[0], "cached": cached_losses[0]},
            "memory": {"live": mem_live.result, "cached": mem_cached.result}}


def fastflow_equivalence(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load anomalib FastFlow's weights (dumped by ``anomalib_peers.py``) into flowlib's and compare.

    Both use FrEIA-0.2 ``AllInOneBlock`` arithmetic; flowlib permutes with an index gather where anomalib
    multiplies by a permutation matrix, so equal weights must give equal maps up to float rounding.
    """
    dump = torch.load(spec["path"], weights_only=False)
    model = _build(spec, device).eval()
    state = dump["state_dict"]
    # backbone: both are timm's resnet18 (features_only in anomalib); match tensors by name suffix
    bb_target = model.backbone.body.model.state_dict()
    bb_prefix = "feature_extractor."
    bb_source = {k[len(bb_prefix):]: v for k, v in state.items() if k.startswith(bb_prefix)}
    missing = [k for k in bb_target if k not in bb_source]
    if missing:
        raise KeyError(f"anomalib's backbone lacks {missing[:5]}...; cannot copy the weights")
    model.backbone.body.model.load_state_dict({k: bb_source[k] for k in bb_target})
    for i, norm in enumerate(model.norms):
        norm.load_state_dict({"weight": state[f"norms.{i}.weight"], "bias": state[f"norms.{i}.bias"]})
    n_blocks = 0
    for i, flow in enumerate(model.flows):
        for j, block in enumerate(flow.blocks):
            prefix = f"fast_flow_blocks.{i}.module_list.{j}."
            block.load_freia_block(_FreiaBlockView(state, prefix))
            n_blocks += 1
    images = dump["images"].to(device)
    size = images.shape[-1]
    with torch.no_grad():
        feats = model.extract(images)
        maps, scores = model.predict(feats, (size, size))
        latents, log_det = model(feats)
        loss = float(model.loss(feats))
    ref_map = dump["anomaly_map"][:, 0].to(device)
    ref_hidden = [h.to(device) for h in dump["hidden"]]
    ref_log_det = sum(j.to(device) for j in dump["log_jac"])
    return {
        "side": "flowlib", "method": "fastflow", "kind": "equivalence", "blocks_copied": n_blocks,
        "batch": int(images.shape[0]), "input_size": int(size),
        "max_abs_diff_anomaly_map": float((maps - ref_map).abs().max()),
        "anomaly_map_range": [float(ref_map.min()), float(ref_map.max())],
        "max_abs_diff_score": float((scores - dump["pred_score"].reshape(-1).to(device)).abs().max()),
        "max_rel_diff_latents": max(float((z - r).abs().max() / r.abs().max())
                                    for z, r in zip(latents, ref_hidden, strict=True)),
        "max_abs_diff_log_det": float((log_det - ref_log_det).abs().max()),
        "log_det_scale": float(ref_log_det.abs().max()),
        "loss_flowlib": loss, "loss_anomalib": dump["loss"],
    }


class _FreiaBlockView:
    """The attributes :meth:`AllInOneCoupling.load_freia_block` reads, taken from a state dict."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.w_perm = state[prefix + "w_perm"]
        self.global_scale = state[prefix + "global_scale"]
        self.global_offset = state[prefix + "global_offset"]
        head = prefix + "subnet."
        sub = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
        self.subnet = torch.nn.Module()
        self.subnet.state_dict = lambda: sub  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------------
# Orchestrator
# ----------------------------------------------------------------------------------------------------

def worker_environment(threads: int, malloc: str) -> dict[str, str]:
    """Environment of every worker, flowlib's and anomalib's alike.

    ``malloc="tuned"`` gives both sides, from process start, the glibc thresholds that importing flowlib
    sets (:mod:`flowlib.malloc`; anomalib's worker never imports flowlib); ``"default"`` keeps glibc's own.
    """
    from flowlib.malloc import GLIBC_ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k not in GLIBC_ENVIRONMENT and k != "FLOWLIB_MALLOC"}
    if malloc == "tuned":
        env.update(GLIBC_ENVIRONMENT)
    else:
        env["FLOWLIB_MALLOC"] = "default"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def _run_worker(python: str | Path, script: Path, spec: dict[str, Any], threads: int, timeout: float,
                malloc: str) -> dict[str, Any]:
    env = worker_environment(threads, malloc)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = [str(python), str(script), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
    wall = time.perf_counter() - t0
    result = parse_result(proc.stdout)
    if result is None:  # the report's notes list it (from the error row, so a later success can replace it)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": " | ".join(tail), "spec": spec}
    result["worker_wall_s"] = round(wall, 1)
    return result


def _fmt_s(spec: dict[str, Any]) -> str:
    return (f"{spec.get('side', 'flowlib')}:{spec.get('method')}/{spec.get('preset', '-')}"
            f"/{spec['kind']}/b{spec.get('batch', '-')}")


def plan_flowlib(args: argparse.Namespace, log: list[str]) -> list[dict[str, Any]]:
    """The flowlib measurements to make, skipping (with a message) methods that cannot be imported."""
    from flowlib.models import get_config
    from flowlib.models.base import method_spec

    specs = []
    cpu = args.device == "cpu"
    for method in args.methods:
        try:
            importlib.import_module(f"flowlib.models.{method}")
            presets = method_spec(method).presets
        except Exception as err:  # noqa: BLE001 - a method being written must not stop the benchmark
            log.append(f"skipped {method}: cannot be imported ({type(err).__name__}: {err})")
            continue
        for preset in args.presets:
            if preset not in presets:
                log.append(f"skipped {method}/{preset}: no such preset (has {sorted(presets)})")
                continue
            cfg = get_config(method, preset)
            large = preset != "quick"
            reps = args.paper_reps if large else args.reps
            base = {"side": "flowlib", "method": method, "preset": preset, "reps": reps}
            batch_1_only = large and cpu and args.skip_paper_throughput
            infer_batches = [1] if batch_1_only else [1, args.throughput_batch]
            for b in infer_batches:
                specs.append({**base, "kind": "infer", "batch": b})
            if preset in args.compiled:
                specs.append({**base, "kind": "infer_compiled", "batch": 1})
            if large and args.skip_paper_training:
                continue
            train_batch = 1 if (large and cpu) else int(cfg.batch_size)
            for kind in ("train_live", "train_cached"):
                specs.append({**base, "kind": kind, "batch": train_batch})
            if preset in args.compiled_training:
                specs.append({**base, "kind": "train_compiled", "batch": train_batch})
            if preset == "quick" and args.epoch_category:
                specs.append({**base, "kind": "epoch", "batch": int(cfg.batch_size), "reps": 3,
                              "category": args.epoch_category})
    if args.kinds:
        specs = [s for s in specs if s["kind"] in args.kinds]
    return specs


def plan_peers(args: argparse.Namespace, log: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Pairs of (side, spec) for the anomalib comparison."""
    if args.no_peers:
        return []
    python = Path(args.anomalib_python)
    if not python.exists():
        log.append(f"skipped the anomalib comparison: {python} does not exist (see benchmarks/README.md to "
                   "create it, or pass --anomalib-python)")
        return []
    out = []
    for method in args.methods:
        if method not in PEERS:
            continue
        log.append(f"{method}: also runs the anomalib comparison ({args.peer_rounds} round(s); --no-peers "
                   "leaves it out, and with --merge the new rounds replace the report's earlier ones)")
        peer = PEERS[method]
        ours = {"side": "flowlib", **peer["ours"], "reps": args.reps, "group": f"peer:{method}"}
        theirs = {"side": "anomalib", **peer["anomalib"], "reps": args.reps, "group": f"peer:{method}"}
        pairs = (("infer", 1), ("infer", args.throughput_batch), ("train_live", args.peer_train_batch),
                 ("train_cached", args.peer_train_batch))
        # alternate the two sides, round after round, so that a change in the machine's load hits both
        for _ in range(max(1, args.peer_rounds)):
            for kind, batch in pairs:
                out.append(("anomalib", {**theirs, "kind": kind, "batch": batch}))
                out.append(("flowlib", {**ours, "kind": kind, "batch": batch}))
        if method == "fastflow" and not args.no_equivalence:
            out.append(("anomalib", {**theirs, "kind": "dump", "batch": 2}))
            out.append(("flowlib", {**ours, "kind": "equivalence", "batch": 2}))
    return out


def _gflops(flops: float) -> float:
    return flops / 1e9


def _rates(r: dict[str, Any], key: str) -> dict[str, float]:
    """GFLOP/s of backbone, head and whole from the times under ``key`` (``median_s`` or ``cpu_median_s``)."""
    fl = r["flops"]

    def seconds(part: str) -> float | None:
        v = r.get(part)
        return v.get(key) if isinstance(v, dict) else None

    rate = {}
    if fl.get("backbone") and seconds("backbone"):
        rate["backbone"] = _gflops(fl["backbone"]) / seconds("backbone")
    head_s = seconds("head")
    if head_s is None and r.get("side") == "anomalib" and seconds("total") and seconds("backbone"):
        # anomalib's model runs as one call: its head is the whole minus the backbone timed alone
        head_s = max(seconds("total") - seconds("backbone"), 1e-9)
        r.setdefault("head_estimate", {})[key] = head_s
    if fl.get("head") and head_s:
        rate["head"] = _gflops(fl["head"]) / head_s
    total = fl.get("total") or fl.get("train_step")
    if total and seconds("total"):
        rate["total"] = _gflops(total) / seconds("total")
    return {k: round(v, 2) for k, v in rate.items()}


def derive(r: dict[str, Any]) -> None:
    """Add per-image FLOPs and the achieved FLOP/s (per wall-clock and per CPU second) in place."""
    if "error" in r or "flops" not in r or r.get("kind") in ("dump", "equivalence", "infer_compiled"):
        return
    r["gflops_per_image"] = {k: round(_gflops(v / r["batch"]), 4) for k, v in r["flops"].items()}
    r["achieved_gflop_per_s"] = _rates(r, "median_s")
    r["achieved_gflop_per_cpu_s"] = _rates(r, "cpu_median_s")


def _find(results: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in results:
        if "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _cpu_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    o, t = ours["total"].get("cpu_median_s"), theirs["total"].get("cpu_median_s")
    return o / t if o and t else None


def _pooled(results: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The matching result, or with several rounds a copy whose times are the medians over the rounds."""
    found = [r for r in results if "error" not in r and all(r.get(k) == v for k, v in match.items())]
    if len(found) <= 1:
        return found[0] if found else None
    pooled = dict(found[0])
    pooled["rounds"] = len(found)
    for part in ("total", "backbone", "head"):
        if all(isinstance(r.get(part), dict) for r in found):
            pooled[part] = {key: statistics.median(r[part][key] for r in found)
                            for key in ("median_s", "cpu_median_s") if all(key in r[part] for r in found)}
    return pooled


def _head_seconds(r: dict[str, Any], key: str) -> float | None:
    if isinstance(r.get("head"), dict) and key in r["head"]:
        return r["head"][key]
    return r.get("head_estimate", {}).get(key)  # reports made before anomalib's head was timed alone


def compare_peers(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time ratios flowlib / anomalib for every peer measurement (whole model and head alone)."""
    rows = []
    b, tb = args.peer_train_batch, args.throughput_batch
    for method in args.methods:
        if method not in PEERS:
            continue
        group = f"peer:{method}"
        for kind, batch, what in (("infer", 1, "inference latency, batch 1 (s/image)"),
                                  ("infer", tb, f"inference, batch {tb} (s/batch)"),
                                  ("train_live", b, f"training step, batch {b} (s/step)"),
                                  ("train_cached", b,
                                   f"training step on cached features, batch {b} (s/step)")):
            ours = _pooled(results, group=group, side="flowlib", kind=kind, batch=batch)
            theirs = _pooled(results, group=group, side="anomalib", kind=kind, batch=batch)
            if ours is None or theirs is None:
                continue
            o, t = ours["total"]["median_s"], theirs["total"]["median_s"]
            row = {"method": method, "measurement": what, "kind": kind, "batch": batch,
                   "rounds": ours.get("rounds", 1), "flowlib_s": o, "anomalib_s": t, "ratio": o / t,
                   "ratio_cpu_time": _cpu_ratio(ours, theirs)}
            ho, ht = _head_seconds(ours, "median_s"), _head_seconds(theirs, "median_s")
            if kind != "train_cached" and ho and ht:
                row.update(flowlib_head_s=ho, anomalib_head_s=ht, head_ratio=ho / ht,
                           anomalib_head_is_estimate=not isinstance(theirs.get("head"), dict))
                hco, hct = _head_seconds(ours, "cpu_median_s"), _head_seconds(theirs, "cpu_median_s")
                if hco and hct:
                    row["head_ratio_cpu_time"] = hco / hct
                row["flowlib_gflops_per_image"] = ours.get("gflops_per_image")
                row["anomalib_gflops_per_image"] = theirs.get("gflops_per_image")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"# flowlib benchmark ({report['finished'][:10]})",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, "
        f"{m['memory_gb']} GiB; {m.get('gpu', 'no GPU')}; device `{m['device']}`; torch {m['torch']}, "
        f"Python {m['python']}; torch threads per measurement: {s['threads'] or 'torch default'}; "
        + ("glibc malloc tuned as importing flowlib does (`flowlib/malloc.py`: freed memory is reused), for "
           "flowlib's and anomalib's workers alike."
           if s.get("malloc") == "tuned" else "glibc malloc with its default settings (`--malloc default`)."),
        f"Load average (1/5/15 min) at start {report['load_average_start']}, at end "
        f"{report['load_average_end']}"
        + (" — the machine was busy with other work, so times are pessimistic and noisy."
           if max(report['load_average_start'][0], report['load_average_end'][0]) > m['usable_cores']
           else " (a one-thread measurement itself adds about 1)."),
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    for run in report.get("previous_runs", []):
        lines += [f"Earlier run merged into this report: `{run['command']}` ({run['started']}, load average "
                  f"{run['load_average_start']} → {run['load_average_end']}); the rows it measured and "
                  "later runs did not repeat are kept.", ""]
    tb = s["throughput_batch"]
    lines += [
        "Models are built without pretrained weights (speed does not depend on them). Medians of "
        f"{s['reps']} timed calls ({s['paper_reps']} for paper presets) after one warm-up. FLOPs count "
        "convolutions and matrix products (2 per multiply-add), per image; the GFLOPs column is at batch "
        "1, and each FLOP/s figure uses the count at its own batch (a head that computes a part once per "
        "batch, as MSFlow's subnets do for the positional encoding, does fewer FLOPs per image at batch "
        f"{tb}). *bb* = frozen backbone "
        "(`extract`), *head* = flow + scoring (`predict`) or flow + loss + backward + optimiser step. "
        "† = measured while the load average exceeded the number of cores (other work running): "
        "slower and noisier than the machine can do.",
        "",
        "## Inference",
        "",
        "| method | preset | backbone @ px | trainable params | GFLOPs bb / head (head %) | batch 1: ms/img "
        f"(bb + head) | batch 1: CPU ms/img | batch {tb}: img/s | achieved GFLOP/s bb / head, batch 1: "
        f"wall (CPU time) | achieved GFLOP/s bb / head, batch {tb} "
        f"| peak mem MB b1 / b{tb} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    res = report["results"]
    keys = []
    for r in res:
        if r.get("side") == "flowlib" and "group" not in r and "error" not in r:
            k = (r["method"], r["preset"])
            if k not in keys:
                keys.append(k)
    def tag(*rows: dict[str, Any] | None) -> str:  # measured while other work shared the cores
        busy = [r for r in rows if r is not None and r.get("load_average", [0])[0] > m["usable_cores"]]
        return " †" if busy else ""

    for method, preset in keys:
        b1 = _find(res, side="flowlib", method=method, preset=preset, kind="infer", batch=1, group=None)
        b16 = _find(res, side="flowlib", method=method, preset=preset, kind="infer",
                    batch=s["throughput_batch"], group=None)
        if b1 is None:
            continue
        g = b1["gflops_per_image"]
        share = 100 * g["head"] / g["total"] if g["total"] else 0
        rate = b1.get("achieved_gflop_per_s", {})
        cpu_rate = b1.get("achieved_gflop_per_cpu_s", {})
        rate16 = b16.get("achieved_gflop_per_s", {}) if b16 else {}
        lines.append(
            f"| {method} | {preset}{tag(b1, b16)} | {b1['backbone_name']} @ {b1['input_size']} | "
            f"{b1['trainable_parameters']:,} | "
            f"{g['backbone']:.3g} / {g['head']:.3g} ({share:.0f} %) | "
            f"{b1['ms_per_image']:.1f} ({1000 * b1['backbone']['median_s']:.1f} + "
            f"{1000 * b1['head']['median_s']:.1f}) | "
            f"{_num(1000 * b1['total'].get('cpu_median_s', float('nan')), '{:.1f}')} | "
            f"{_num(b16['images_per_s'] if b16 else None, '{:.3g}')} | "
            f"{_num(rate.get('backbone'), '{:.1f}')} / {_num(rate.get('head'), '{:.1f}')} "
            f"({_num(cpu_rate.get('backbone'), '{:.1f}')} / {_num(cpu_rate.get('head'), '{:.1f}')}) | "
            f"{_num(rate16.get('backbone'), '{:.1f}')} / {_num(rate16.get('head'), '{:.1f}')} | "
            f"{b1['memory']['peak_mb']:.0f} / {_num(b16['memory']['peak_mb'] if b16 else None, '{:.0f}')} |")
    lines += [
        "",
        "## Training",
        "",
        "| method | preset | batch | live: img/s (bb + head s/step) | cached: img/s | cached speed-up "
        "(CPU time) | head training GFLOPs/img | achieved GFLOP/s head, cached: wall (CPU time) "
        "| peak mem MB live / cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, preset in keys:
        live = _find(res, side="flowlib", method=method, preset=preset, kind="train_live", group=None)
        cached = _find(res, side="flowlib", method=method, preset=preset, kind="train_cached", group=None)
        if live is None and cached is None:
            continue
        speed = (cached["images_per_s"] / live["images_per_s"]) if (live and cached) else None
        cpu_speed = None
        if live and cached and cached["total"].get("cpu_median_s"):
            cpu_speed = live["total"]["cpu_median_s"] / cached["total"]["cpu_median_s"]
        live_txt = (f"{live['images_per_s']:.2f} ({live['backbone']['median_s']:.3f} + "
                    f"{live['head']['median_s']:.3f})") if live else "–"
        head_gf = cached["gflops_per_image"]["head"] if cached else None
        rate = cached.get("achieved_gflop_per_s", {}).get("total") if cached else None
        cpu_rate = cached.get("achieved_gflop_per_cpu_s", {}).get("total") if cached else None
        mem = (f"{_num(live['memory']['peak_mb'] if live else None, '{:.0f}')} / "
               f"{_num(cached['memory']['peak_mb'] if cached else None, '{:.0f}')}")
        batch = (live or cached)["batch"]
        lines.append(f"| {method} | {preset}{tag(live, cached)} | {batch} | {live_txt} | "
                     f"{_num(cached['images_per_s'] if cached else None, '{:.2f}')} | "
                     f"{_num(speed, '{:.2f}×')} ({_num(cpu_speed, '{:.2f}×')}) | {_num(head_gf, '{:.3g}')} | "
                     f"{_num(rate, '{:.1f}')} ({_num(cpu_rate, '{:.1f}')}) | "
                     f"{mem} |")
    epochs = [r for r in res if r.get("kind") == "epoch" and "error" not in r and "group" not in r]
    if epochs:
        lines += [
            "",
            "### Training epochs of `engine.fit` on the built-in data",
            "",
            "*live*: every epoch reads and resizes the images and runs the backbone "
            "(`cache_features=False`); *cached*: the epoch replays features extracted once, in a caching "
            "pass paid once per training run. Medians of 3 epochs; the first-epoch losses of the two sides "
            "(same seed, same batches) agree up to float rounding.",
            "",
            "| method | preset | category (images, batch) | live s/epoch | cached s/epoch | cached speed-up "
            "(CPU time) | caching pass s | caching pays off after | first-epoch loss live / cached |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in epochs:
            gain = r["live"]["median_s"] - r["cached"]["median_s"]
            payoff = r["caching"]["median_s"] / gain if gain > 0 else None
            loss = r["first_epoch_loss"]
            lines.append(
                f"| {r['method']} | {r['preset']}{tag(r)} | {r['category']} ({r['images']}, {r['batch']}) | "
                f"{r['live']['median_s']:.2f} | {r['cached']['median_s']:.2f} | "
                f"{r['speedup']:.2f}× ({r['speedup_cpu_time']:.2f}×) | {r['caching']['median_s']:.2f} | "
                f"{_num(payoff, '{:.1f} epochs')} | {loss['live']:.6g} / {loss['cached']:.6g} |")
    compiled = [r for r in res if r.get("kind") == "infer_compiled" and "error" not in r]
    if compiled:
        lines += [
            "",
            "## Compiled inference (`model.compile_inference()`, `torch.compile` with its defaults)",
            "",
            "One process per row: the eager and the compiled model alternate call by call; the speed-up is "
            "the median of the per-call ratios. *compile s*: the first compiled call (paid once per input "
            "shape). The maps and scores are compared with the eager model's. *vs eager alone*: the `infer` "
            "row's batch-1 time (eager model in a process of its own, measured minutes apart) over the "
            "compiled time; a cross-check, noisier than the alternated ratio.",
            "",
            "| method | preset | batch | eager ms (bb + head) | compiled ms (bb + head) | "
            "speed-up bb / head / total | vs eager alone | achieved GFLOP/s bb / head, compiled "
            "| compile s | max rel. map diff |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in compiled:
            e, c, sp, fl = r["eager"], r["compiled"], r["speedup"], r["flops"]
            rate = [fl[part] / 1e9 / c[part]["median_s"] for part in ("backbone", "head")]
            alone = _find(res, side="flowlib", method=r["method"], preset=r["preset"], kind="infer",
                          batch=r["batch"], group=None)
            vs_alone = alone["total"]["median_s"] / c["total"]["median_s"] if alone else None
            lines.append(
                f"| {r['method']} | {r['preset']}{tag(r)} | {r['batch']} | "
                f"{1000 * e['total']['median_s']:.1f} ({1000 * e['backbone']['median_s']:.1f} + "
                f"{1000 * e['head']['median_s']:.1f}) | {1000 * c['total']['median_s']:.1f} "
                f"({1000 * c['backbone']['median_s']:.1f} + {1000 * c['head']['median_s']:.1f}) | "
                f"{sp['backbone']:.2f}× / {sp['head']:.2f}× / **{sp['total']:.2f}×** | "
                f"{_num(vs_alone, '{:.2f}×')} | "
                f"{rate[0]:.1f} / {rate[1]:.1f} | {r['compile_s']:.0f} | {r['max_rel_diff_maps']:.1e} |")
    compiled_steps = [r for r in res if r.get("kind") == "train_compiled" and "error" not in r]
    if compiled_steps:
        lines += [
            "",
            "## Compiled training steps (`torch.compile(model.loss)` with its defaults)",
            "",
            "One process per row: two copies of the model with the same weights take the same training "
            "steps on the same cached features, one with the eager loss, one with the compiled loss (its "
            "backward compiled too), steps alternated; the speed-up is the median of the per-step ratios. "
            "*compile s*: the compiled side's first step, in an empty compiler cache (paid once per batch "
            "shape; a last, smaller batch compiles again). *max rel. loss diff*: the largest relative "
            "difference between the two sides' losses over the steps compared; with the same weights, "
            "batches and random draws, it is rounding unless compiling changed the computation.",
            "",
            "| method | preset | batch | eager ms/step | compiled ms/step | speed-up | compile s "
            "| steps compared | max rel. loss diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in compiled_steps:
            lines.append(
                f"| {r['method']} | {r['preset']}{tag(r)} | {r['batch']} | "
                f"{1000 * r['eager']['median_s']:.1f} | {1000 * r['compiled']['median_s']:.1f} | "
                f"**{r['speedup']:.2f}×** | {r['compile_s']:.0f} | {len(r['losses']['eager'])} | "
                f"{r['max_rel_loss_diff']:.1e} |")
    if report["peers"]:
        lines += ["", "## flowlib vs anomalib (same inputs, same batch, same machine, sides alternated)", ""]
        for method in dict.fromkeys(p["method"] for p in report["peers"]):
            lines.append(f"- {PEERS[method]['label']}; anomalib {report.get('anomalib_version', '?')}.")
        lines += ["", "| method | measurement | flowlib | anomalib | ratio flowlib / anomalib "
                  "| ratio of CPU time | rounds |",
                  "|---|---|---|---|---|---|---|"]
        for p in report["peers"]:
            lines.append(f"| {p['method']} | {p['measurement']} | {p['flowlib_s']:.3f} | "
                         f"{p['anomalib_s']:.3f} | "
                         f"**{p['ratio']:.2f}** | {_num(p.get('ratio_cpu_time'), '{:.2f}')} | "
                         f"{p.get('rounds', 1)} |")
        heads = [p for p in report["peers"] if p.get("head_ratio")]
        if heads:
            lines += ["", "The flow head alone (inference: flow + scoring; training: flow + loss + backward "
                      "+ step; both sides timed on the features their backbone just gave):",
                      "", "| method | measurement | flowlib head s | anomalib head s | ratio "
                      "| ratio of CPU time | head GFLOPs/img flowlib / anomalib |",
                      "|---|---|---|---|---|---|---|"]
            for p in heads:
                fg, ag = p.get("flowlib_gflops_per_image") or {}, p.get("anomalib_gflops_per_image") or {}
                mark = " \\*" if p.get("anomalib_head_is_estimate") else ""
                lines.append(f"| {p['method']} | {p['kind']}, batch {p['batch']} | "
                             f"{p['flowlib_head_s']:.3f} | {p['anomalib_head_s']:.3f}{mark} | "
                             f"{p['head_ratio']:.2f} | "
                             f"{_num(p.get('head_ratio_cpu_time'), '{:.2f}')} | "
                             f"{_num(fg.get('head'))} / {_num(ag.get('head'))} |")
        if any(p.get("anomalib_head_is_estimate") for p in heads):
            lines += ["", "\\* anomalib's whole model minus its backbone timed on its own (reports made "
                      "before anomalib's head was timed directly); an estimate only as good as the two "
                      "medians it subtracts."]
    eq = report.get("equivalence")
    if eq:
        lines += ["", "## Same weights, same outputs (FastFlow)", ""]
        if "error" in eq:
            lines.append(f"Not checked: {eq['error']}")
        else:
            lines.append(
                f"anomalib FastFlow's weights (backbone, LayerNorms, {eq['blocks_copied']} AllInOne blocks) "
                f"loaded into flowlib's; on {eq['batch']} random {eq['input_size']} px images the anomaly "
                f"maps (range {eq['anomaly_map_range'][0]:.3f} … {eq['anomaly_map_range'][1]:.3f}) differ by "
                f"at most {eq['max_abs_diff_anomaly_map']:.2e}, the latents by "
                f"{eq['max_rel_diff_latents']:.2e} (relative), "
                f"the log-determinants by {eq['max_abs_diff_log_det']:.2e} (of {eq['log_det_scale']:.3g}); "
                f"loss {eq['loss_flowlib']:.6g} (flowlib) vs {eq['loss_anomalib']:.6g} (anomalib).")
    notes = list(report["log"]) + [f"FAILED {_fmt_s(r['spec'])}: {r['error']}"
                                   for r in report["results"] if "error" in r]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def _result_key(r: dict[str, Any]) -> tuple:
    """What a result measured: the peer group (all its rounds), else side, method, preset, kind and batch.

    A failed measurement (``{"error": ..., "spec": ...}``) has the key of its spec, so a later successful
    run of the same measurement replaces it in a merged report.
    """
    src = r["spec"] if "error" in r and "spec" in r else r
    if src.get("group"):
        return (src["group"],)
    return (src.get("side", "flowlib"), src.get("method"), src.get("preset"), src.get("kind"),
            src.get("batch"))


def merge_reports(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the results of ``old`` for the measurements ``new`` did not make (see ``--merge``).

    An old result, failed or not, is dropped when ``new`` measured the same thing successfully. The notes
    shown are the new run's; each earlier run's own notes stay in the JSON under ``previous_runs``.
    """
    measured = {_result_key(r) for r in new["results"] if "error" not in r}
    kept = [r for r in old["results"] if _result_key(r) not in measured]
    merged = dict(new)
    merged["results"] = kept + new["results"]
    methods = list(dict.fromkeys(old["settings"]["methods"] + new["settings"]["methods"]))
    merged["settings"] = {**new["settings"], "methods": methods}
    merged["previous_runs"] = old.get("previous_runs", []) + [
        {k: old[k] for k in ("command", "started", "finished", "load_average_start", "load_average_end")}
        | {"log": old.get("log", [])}]
    merged["equivalence"] = new.get("equivalence") or old.get("equivalence")
    merged["anomalib_version"] = new.get("anomalib_version") or old.get("anomalib_version")
    merged["log"] = list(new.get("log", []))
    merged["peers"] = compare_peers(merged["results"], argparse.Namespace(**merged["settings"]))
    return merged


def rerender(path: Path) -> int:
    """Recompute the derived numbers and the markdown of a JSON report (after a change to this script)."""
    report = json.loads(path.read_text(encoding="utf-8"))
    # failures are listed from their error rows now; older reports also kept them as log lines
    report["log"] = [x for x in report.get("log", []) if not x.startswith("FAILED ")]
    for r in report["results"]:
        derive(r)
    settings = argparse.Namespace(**report["settings"])
    report["peers"] = compare_peers(report["results"], settings)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(f"rewrote {path} and {path.with_suffix('.md')}")
    return 0


def _comma_list(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``; ``""`` -> ``[]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark (``--methods``, ``--presets`` and ``--compiled`` parse to lists)."""
    parser = argparse.ArgumentParser(description="flowlib speed benchmark (see the module docstring).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--methods", type=_comma_list, default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods (default: %(default)s)")
    parser.add_argument("--presets", type=_comma_list, default="quick,paper",
                        help="comma-separated presets (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="output folder (default: benchmarks/results)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc of every worker (both sides): 'tuned' = what importing flowlib "
                             "sets (freed memory reused, flowlib/malloc.py), 'default' = glibc's own")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per measurement (0: torch's default, all cores)")
    parser.add_argument("--reps", type=int, default=5,
                        help="timed calls per measurement (quick presets, peers)")
    parser.add_argument("--paper-reps", type=int, default=2, help="timed calls for the paper presets")
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument("--peer-train-batch", type=int, default=8)
    parser.add_argument("--peer-rounds", type=int, default=1,
                        help="repeat the anomalib comparison this many times, alternating the sides")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other results of the existing report in --out, replacing only "
                             "what this run measured (e.g. a re-run of the peers alone with --presets '')")
    parser.add_argument("--epoch-category", default="brick",
                        help="built-in category whose training epochs are timed, live and cached, for the "
                             "quick presets ('' to leave this out; default: %(default)s)")
    parser.add_argument("--compiled", type=_comma_list, default="quick",
                        help="presets whose inference is also timed compiled (torch.compile), beside the "
                             "eager model, at batch 1 ('' to leave this out; default: %(default)s)")
    parser.add_argument("--compiled-training", type=_comma_list, default="quick",
                        help="presets whose training step on cached features is also timed with a compiled "
                             "loss (torch.compile), alternated with the eager step, at the training batch "
                             "('' to leave this out; default: %(default)s)")
    parser.add_argument("--kinds", type=_comma_list, default="",
                        help="only these measurements of flowlib's models, e.g. 'train_compiled' or "
                             f"'infer,epoch' (of: {', '.join(FLOWLIB_KINDS)}; default: all that the other "
                             "options ask for)")
    parser.add_argument("--skip-paper-training", action="store_true",
                        help="measure only inference for the (large) paper presets")
    parser.add_argument("--skip-paper-throughput", action="store_true",
                        help="on a CPU, time the (large) paper presets' inference at batch 1 only, not also "
                             "at --throughput-batch (about 28 min less with one CPU thread)")
    parser.add_argument("--no-peers", action="store_true", help="leave out the anomalib comparison")
    parser.add_argument("--no-equivalence", action="store_true", help="leave out the FastFlow weight check")
    parser.add_argument("--anomalib-python", default=str(ANOMALIB_PYTHON))
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds allowed per measurement (default: %(default)s; FastFlow's CaiT paper "
                             "preset at batch 16 took about 1000 with one CPU thread)")
    parser.add_argument("--report", metavar="JSON",
                        help="only rewrite the tables of an earlier run's JSON, measuring nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        from flowlib import malloc

        emit({**measure(spec), "malloc": malloc.STATUS})  # e.g. "set by the environment (...)"
        return 0
    if args.report:
        return rerender(Path(args.report))
    unknown = [k for k in args.kinds if k not in FLOWLIB_KINDS]
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(FLOWLIB_KINDS)}.")

    from flowlib.config import get_device

    try:
        device = get_device(args.device)
    except ValueError as err:
        parser.error(f"--device {args.device}: {err}")
    common = {"device": args.device, "threads": args.threads, "seed": 0, "input_seed": 1234}
    log: list[str] = []
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    plan = [("flowlib", s) for s in plan_flowlib(args, log)] + plan_peers(args, log)
    for line in log:
        print(line, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="flowlib-bench-"))
    results: list[dict[str, Any]] = []
    equivalence = None
    anomalib_version = None
    for i, (side, spec) in enumerate(plan, 1):
        spec = {**common, **spec}
        if spec["kind"] in ("dump", "equivalence"):
            spec["path"] = str(tmp / "anomalib_fastflow.pt")
            if spec["kind"] == "equivalence" and not Path(spec["path"]).exists():
                equivalence = {"error": "anomalib's dump failed (see the notes)"}
                continue
        python = args.anomalib_python if side == "anomalib" else sys.executable
        script = HERE / ("anomalib_peers.py" if side == "anomalib" else "run.py")
        print(f"[{i}/{len(plan)}] {_fmt_s(spec)} ...", end=" ", flush=True)
        r = _run_worker(python, script, spec, args.threads, args.timeout, args.malloc)
        if "group" in spec and "error" not in r:
            r["group"] = spec["group"]
        if "error" in r:
            print(f"failed: {r['error'][-400:]}", flush=True)
        elif spec["kind"] == "equivalence":
            equivalence = r
            print(f"max |map diff| {r['max_abs_diff_anomaly_map']:.2e}", flush=True)
        elif spec["kind"] == "dump":
            print("ok", flush=True)
        elif spec["kind"] == "infer_compiled":
            print(f"compiled in {r['compile_s']:.0f} s, {r['speedup']['total']:.2f}x faster than eager "
                  f"(load {r.get('load_average', ['?'])[0]})", flush=True)
        elif spec["kind"] == "train_compiled":
            print(f"compiled in {r['compile_s']:.0f} s, steps {r['speedup']:.2f}x as fast as eager "
                  f"(load {r.get('load_average', ['?'])[0]})", flush=True)
        elif spec["kind"] == "epoch":
            print(f"{r['live']['median_s']:.2f} s/epoch live, {r['cached']['median_s']:.2f} s/epoch cached "
                  f"(load {r.get('load_average', ['?'])[0]})", flush=True)
        else:
            derive(r)
            print(f"{r['total']['median_s']:.3f} s/call, {r['images_per_s']:.2f} img/s "
                  f"(load {r['load_average'][0]})", flush=True)
        anomalib_version = anomalib_version or r.get("anomalib_version")
        if spec["kind"] not in ("dump", "equivalence"):
            results.append(r)
    report = {
        "command": " ".join(shlex.quote(a) for a in
                            [".venv/bin/python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "anomalib_version": anomalib_version,
        "results": results,
        "peers": compare_peers(results, args),
        "equivalence": equivalence,
        "log": log,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_{device.type}"
    if args.merge and (out / f"{name}.json").exists():
        report = merge_reports(json.loads((out / f"{name}.json").read_text(encoding="utf-8")), report)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
