"""Timing, memory and machine helpers shared by both sides of the benchmark.

This module needs only the standard library and torch, so the anomalib side (which runs in its own
virtual environment, without flowlib) measures exactly the same way as the flowlib side.

Conventions:

* a measurement runs in its own process, so its peak memory is not hidden by an earlier one;
* CPU peak memory is the growth of the process's resident set during the measurement:
  ``ru_maxrss`` after it minus the resident set just before it (``tracemalloc`` does not see torch's
  allocations); on a GPU it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before;
* one warm-up call (also used to count FLOPs) precedes the timed calls; we report the median.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

RESULT_PREFIX = "BENCH_RESULT "


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (how busy the machine was; ``os.cpu_count()`` is the full load)."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm", encoding="utf-8") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Context manager measuring the extra memory a block of code needed at its peak.

    ``result`` holds ``peak_mb`` (growth over the state before the block), ``before_mb`` (resident /
    allocated before) and, on CPU, ``setup_peak_dominates`` (the process had already been larger while
    building the model, so ``peak_mb`` is a lower bound).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict[str, Any] = {}

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._before = rss_mb()
            self._max_before = maxrss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.result = {"kind": "cuda_allocated", "before_mb": round(self._before, 1),
                           "peak_mb": round(peak - self._before, 1)}
        else:
            after = maxrss_mb()
            self.result = {"kind": "cpu_rss", "before_mb": round(self._before, 1),
                           "peak_mb": round(max(after - self._before, 0.0), 1),
                           "process_peak_mb": round(after, 1),
                           "setup_peak_dominates": after <= self._max_before}


def stamp(device: torch.device) -> tuple[float, float]:
    """``(wall, cpu)`` seconds now, after waiting for the GPU. CPU time counts every thread of the process."""
    sync(device)
    return time.perf_counter(), time.process_time()


def time_calls(fn: Callable[[], Any], reps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds taken by each of ``reps`` calls of ``fn`` (synchronised on GPUs)."""
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = stamp(device)
        fn()
        w1, c1 = stamp(device)
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return wall, cpu


def split_laps(first: Callable[[], Any], second: Callable[[Any], Any], reps: int, device: torch.device
               ) -> dict[str, tuple[list[float], list[float]]]:
    """Time ``second(first())`` ``reps`` times: wall and CPU seconds of each part and of the whole.

    Returns ``{"backbone": (wall, cpu), "head": (wall, cpu), "total": (wall, cpu)}`` (lists of seconds).
    """
    laps: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("backbone", "head", "total")}
    for _ in range(reps):
        w0, c0 = stamp(device)
        out = first()
        w1, c1 = stamp(device)
        second(out)
        w2, c2 = stamp(device)
        for key, (w, c) in (("backbone", (w1 - w0, c1 - c0)), ("head", (w2 - w1, c2 - c1)),
                            ("total", (w2 - w0, c2 - c0))):
            laps[key][0].append(w)
            laps[key][1].append(c)
    return laps


def summary(wall: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    """Median and minimum wall time, and the median CPU time (robust to other processes on a busy
    machine when a measurement uses one thread)."""
    out = {"median_s": statistics.median(wall), "min_s": min(wall), "reps": len(wall)}
    if cpu:
        out["cpu_median_s"] = statistics.median(cpu)
    return out


#: Modules whose matrix products stand in for elementwise work and are not counted as the model's FLOPs:
#: ``flowlib.resize.BilinearResize`` (bilinear upsampling of score maps as products with mostly-zero
#: interpolation matrices). Named, not imported, so that this module needs no flowlib.
NOT_MODEL_FLOPS = ("BilinearResize",)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` once under ``FlopCounterMode``; returns its output and the FLOPs (2 per multiply-add).

    Only matrix products and convolutions are counted (what ``FlopCounterMode`` knows); elementwise
    operations are left out, as in every FLOP figure quoted for these models, and so are the products
    of the modules in :data:`NOT_MODEL_FLOPS`, which do elementwise work as products.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    counts = counter.get_flop_counts()
    apart = sum(sum(counts.get(name, {}).values()) for name in NOT_MODEL_FLOPS)
    return out, int(counter.get_total_flops()) - int(apart)


def inference_context(spec: dict[str, Any]) -> Any:
    """The autograd mode inference is timed under: ``spec["grad_mode"]``, ``"inference"`` (default,
    ``torch.inference_mode()``, what ``engine.evaluate`` uses) or ``"no_grad"``."""
    mode = spec.get("grad_mode", "inference")
    if mode not in ("inference", "no_grad"):
        raise ValueError(f"grad_mode={mode!r}: use 'inference' or 'no_grad'.")
    return torch.inference_mode() if mode == "inference" else torch.no_grad()


def measure_inference(backbone: Callable[[], Any], head: Callable[[Any], Any], spec: dict[str, Any],
                      batch: int, reps: int, device: torch.device) -> dict[str, Any]:
    """Time ``head(backbone())`` under :func:`inference_context`, both parts apart, and count their FLOPs.

    ``backbone()`` returns features for one batch of ``batch`` images; ``head(features)`` scores them.
    Returns the fields of an ``infer`` row: ``total``/``backbone``/``head`` summaries, ``memory``,
    ``flops`` (per batch), ``grad_mode``, ``ms_per_image`` and ``images_per_s``. Both sides of the
    benchmark (flowlib's workers and anomalib's) measure with this one function.
    """
    with inference_context(spec), PeakMemory(device) as mem:
        feats, bb_flops = count_flops(backbone)
        _, head_flops = count_flops(lambda: head(feats))
        laps = split_laps(backbone, head, reps, device)
    t = summary(*laps["total"])
    return {"total": t, "backbone": summary(*laps["backbone"]), "head": summary(*laps["head"]),
            "memory": mem.result,
            "flops": {"backbone": bb_flops, "head": head_flops, "total": bb_flops + head_flops},
            "grad_mode": spec.get("grad_mode", "inference"),
            "ms_per_image": 1000 * t["median_s"] / batch, "images_per_s": batch / t["median_s"]}


def training_step(loss_of: Callable[[Any], torch.Tensor], optimizer: torch.optim.Optimizer,
                  params: list[torch.Tensor], clip: float | None = None, scheduler: Any = None
                  ) -> Callable[[Any], torch.Tensor]:
    """``step(features)``: the training step both sides time, as ``flowlib.engine.fit`` takes it.

    ``loss_of(features)`` gives the scalar loss; then gradients are zeroed, the loss is back-propagated,
    the gradients of ``params`` clipped to norm ``clip`` (when given), the optimiser and the scheduler (when
    given) stepped. Returns the detached loss; reading its value is left to the caller, so a step makes
    no read from the device of its own.
    """
    def step(feats: Any) -> torch.Tensor:
        loss = loss_of(feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss.detach()

    return step


def measure_training(backbone: Callable[[], Any], step: Callable[[Any], Any], cached: Any, batch: int,
                     reps: int, device: torch.device) -> dict[str, Any]:
    """Time training steps: ``step(backbone())`` (live) or, with ``cached`` features, ``step(cached)``.

    ``step(features)`` runs the loss, backward and optimiser step of one batch of ``batch`` images.
    Returns the fields of a ``train_live``/``train_cached`` row: ``total`` (and ``backbone`` when live)
    and ``head`` summaries, ``memory``, ``flops`` (per batch; the backbone's 0 on cached features),
    ``images_per_s`` and ``s_per_step``. Shared by both sides of the benchmark.
    """
    out: dict[str, Any] = {}
    live = cached is None
    with PeakMemory(device) as mem:
        bb_flops = 0
        if live:
            feats, bb_flops = count_flops(backbone)
        else:
            feats = cached
        _, head_flops = count_flops(lambda: step(feats))
        if live:
            laps = split_laps(backbone, step, reps, device)
            total = laps["total"]
            out.update(backbone=summary(*laps["backbone"]), head=summary(*laps["head"]))
        else:
            total = time_calls(lambda: step(cached), reps, device)
            out["head"] = summary(*total)
    t = summary(*total)
    out.update(total=t, memory=mem.result,
               flops={"backbone": bb_flops, "head": head_flops, "total": bb_flops + head_flops},
               images_per_s=batch / t["median_s"], s_per_step=t["median_s"])
    return out


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def emit(result: dict[str, Any]) -> None:
    """Print the worker's result as one line the orchestrator can find among other output."""
    result.setdefault("load_average", load_average())
    result.setdefault("torch_threads", torch.get_num_threads())
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None
