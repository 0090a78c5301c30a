"""The anomalib side of the benchmark: anomalib's FastFlow and CS-Flow torch models, timed like ours.

Runs inside ``benchmarks/.venv-anomalib`` (made by ``make bench`` or by hand, see the README), never in
flowlib's environment, and never imports flowlib. ``run.py`` calls it once per measurement::

    benchmarks/.venv-anomalib/bin/python benchmarks/anomalib_peers.py --worker '{"method": "fastflow", ...}'

and reads the one ``BENCH_RESULT {...}`` line it prints. What is timed is anomalib's ``torch_model``
(``FastflowModel`` / ``CsFlowModel``) plus its loss and the optimiser its Lightning module configures,
without the Lightning trainer around it, so both sides pay for the same work.

No weights are loaded. anomalib's CS-Flow asks torchvision for the EfficientNet-B5 ImageNet weights in
its constructor; :func:`_build_csflow` swaps in a constructor that builds the network with random
weights instead, so nothing is downloaded.

``kind="dump"`` (FastFlow) writes the model's weights, a batch of inputs and the model's outputs to a
file, so that ``run.py`` can load the same weights into flowlib's FastFlow and compare the outputs.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import torch
from timing import (
    emit,
    measure_inference,
    measure_training,
    set_threads,
    sync,
    training_step,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _build_fastflow(spec: dict[str, Any]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    size = int(spec["input_size"])
    model = FastflowModel(input_size=(size, size), backbone=spec.get("backbone", "resnet18"),
                          pre_trained=False,
                          flow_steps=int(spec.get("flow_steps", 8)),
                          conv3x3_only=bool(spec.get("conv3x3_only", False)),
                          hidden_ratio=float(spec.get("hidden_ratio", 1.0)))
    # the optimiser of anomalib's Fastflow Lightning module; no gradient clipping
    optim = {"lr": 1e-3, "weight_decay": 1e-5, "clip": None}
    return model, FastflowLoss(), optim


def _build_csflow(spec: dict[str, Any]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    import torchvision.models
    from anomalib.models.image.csflow import torch_model as cs
    from anomalib.models.image.csflow.loss import CsFlowLoss

    def efficientnet_b5_random(weights: object = None, **kwargs: Any) -> torch.nn.Module:
        del weights  # the ImageNet weights would be downloaded; the timing does not need them
        return torchvision.models.efficientnet_b5(weights=None, **kwargs)

    cs.efficientnet_b5 = efficientnet_b5_random
    size = int(spec["input_size"])
    model = cs.CsFlowModel(input_size=(size, size), cross_conv_hidden_channels=int(spec.get("hidden", 1024)),
                           n_coupling_blocks=int(spec.get("n_coupling_blocks", 4)),
                           clamp=int(spec.get("clamp", 3)), num_channels=3)
    # anomalib's Csflow Lightning module: Adam(2e-4, eps 1e-4, wd 1e-5, betas (0.5, 0.9)), clip 1
    optim = {"lr": 2e-4, "eps": 1e-4, "weight_decay": 1e-5, "betas": (0.5, 0.9), "clip": 1.0}
    return model, CsFlowLoss(), optim


BUILDERS = {"fastflow": _build_fastflow, "csflow": _build_csflow}


class Parts:
    """anomalib's ``forward`` cut into backbone, flow and scoring, so each part is timed on its own.

    Each function repeats, in the same order, what the model's own ``forward`` does (anomalib 2.7
    ``fastflow/torch_model.py`` and ``csflow/torch_model.py``); :func:`check_parts` verifies that the
    pieces give the model's outputs.
    """

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        self.model, self.method = model, method

    def backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.method == "fastflow":
            self.model.feature_extractor.eval()  # FastflowModel.forward does this on every call
        return self.model.feature_extractor(x)

    def flow(self, feats: list[torch.Tensor]) -> tuple[Any, Any]:
        m = self.model
        if self.method == "fastflow":
            normed = [m.norms[i](f) for i, f in enumerate(feats)]
            hidden, log_jac = [], []
            for block, f in zip(m.fast_flow_blocks, normed, strict=True):
                z, j = block(f)
                hidden.append(z)
                log_jac.append(j)
            return hidden, log_jac
        return m.graph(feats)

    def score(self, hidden: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image scores, anomaly maps)``."""
        m = self.model
        if self.method == "fastflow":
            maps = m.anomaly_map_generator(hidden)
            return torch.amax(maps, dim=(-2, -1)), maps
        return m._compute_anomaly_scores(hidden), m.anomaly_map_generator(hidden)

    def head(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.flow(feats)[0])


def check_parts(model: torch.nn.Module, parts: Parts, x: torch.Tensor) -> float:
    """Largest difference between the model's own anomaly maps and those of the parts."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        scores, maps = parts.head(parts.backbone(x))
    return max(float((ref.anomaly_map - maps).abs().max()),
               float((ref.pred_score.reshape(-1) - scores.reshape(-1)).abs().max()))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (``infer``, ``train_live``, ``train_cached`` or ``dump``) of one anomalib model."""
    set_threads(spec.get("threads"))
    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(int(spec.get("seed", 0)))
    model, loss_fn, optim = BUILDERS[spec["method"]](spec)
    model.to(device)
    parts = Parts(model, spec["method"])
    size, batch, reps = int(spec["input_size"]), int(spec["batch"]), int(spec.get("reps", 3))
    generator = torch.Generator().manual_seed(int(spec.get("input_seed", 1234)))
    images = torch.rand(batch, 3, size, size, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # anomalib normalises in its pre-processor, outside the torch model: give it normalised images
    x = ((images - mean) / std).to(device)
    result: dict[str, Any] = {"side": "anomalib", "method": spec["method"], "kind": spec["kind"],
                              "batch": batch, "input_size": size, "device": str(device),
                              "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                          if p.requires_grad)}
    import anomalib

    result["anomalib_version"] = anomalib.__version__
    kind = spec["kind"]
    if kind == "dump":
        result["parts_max_abs_diff"] = check_parts(model, parts, x)
        return _dump(model, loss_fn, images, x, spec, result)
    if kind == "infer":
        model.eval()
        result.update(measure_inference(lambda: parts.backbone(x), parts.head, spec, batch, reps, device))
        return result
    if kind in ("train_live", "train_cached"):
        live = kind == "train_live"
        clip = optim.pop("clip")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, **optim)
        model.train()  # as Lightning does at the start of every training epoch
        cached = None
        if not live:  # anomalib has no feature cache; this times its head on features made beforehand
            with torch.no_grad():
                cached = [f.detach() for f in parts.backbone(x)]

        step = training_step(lambda feats: loss_fn(*parts.flow(feats)), opt, params, clip)
        result.update(measure_training(lambda: parts.backbone(x), step, cached, batch, reps, device))
        return result
    raise ValueError(f"Unknown measurement kind {kind!r} for the anomalib side.")


def _dump(model: torch.nn.Module, loss_fn: Any, images: torch.Tensor, x: torch.Tensor,
          spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Weights, inputs and outputs of anomalib's model, for the equality check on flowlib's side."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        model.train()
        hidden, log_jac = model(x)
        loss = loss_fn(hidden, log_jac)
    model.eval()
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "images": images, "anomaly_map": out.anomaly_map.cpu(), "pred_score": out.pred_score.cpu(),
               "hidden": [h.cpu() for h in hidden], "log_jac": [j.cpu() for j in log_jac],
               "loss": float(loss), "config": {k: spec[k] for k in spec if k not in ("kind",)}}
    torch.save(payload, spec["path"])
    result["path"] = spec["path"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", required=True, help="JSON measurement spec (see run.py)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    spec = json.loads(args.worker)
    emit(measure(spec))
    sync(torch.device(spec.get("device", "cpu")))


if __name__ == "__main__":
    main()
