"""The one training and evaluation loop every method uses.

* :func:`extract_features` runs the frozen backbone once over a dataset (feature caching).
* :func:`fit` trains a model on a dataset or on cached features (seeded shuffling, progress bar,
  gradient clipping, a clear error when the loss stops being finite, optional periodic evaluation).
* :func:`evaluate` returns the metrics of a test set (per category too) plus every anomaly map.
* :func:`run` does all of it for a registered method on a dataset, one model per category (or one
  unified model for methods like HGAD), and writes one JSON result per category.

Example (the reference method on one built-in category; under a minute on a CPU)::

    >>> from flowlib.engine import run
    records = run("gaussian", dataset="demo", categories="brick", preset="quick", out="results/")
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flowlib import metrics as M
from flowlib.checkpoint import save_checkpoint
from flowlib.config import get_device, seed_everything
from flowlib.models.base import AnomalyModel, Features, build_model, get_config, method_spec
from flowlib.results import write_result


@dataclass
class FeatureSet:
    """Backbone features of a whole dataset, kept on the CPU, with the sample metadata.

    Attributes:
        features: one tensor per feature level, each ``(N, ...)``.
        class_ids: ``(N,)`` category index of each sample.
        labels: ``(N,)`` 0 = good, 1 = defective.
        masks: ``(N, H, W)`` uint8 ground truth at the network input size.
        categories, defects, paths: per-sample strings.
        seconds: time spent in the backbone.
    """

    features: list[Tensor]
    class_ids: Tensor
    labels: Tensor
    masks: Tensor
    categories: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                order: Tensor | None = None) -> Iterator[tuple[Features, Tensor, Tensor]]:
        """Yield ``(features, class_ids, indices)`` mini-batches, in the sample ``order`` ``(N,)`` when
        given, else shuffled (``randperm`` from ``generator``) or in storage order."""
        n = len(self)
        if order is None:
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield [f[idx] for f in self.features], self.class_ids[idx], idx


def _no_bar(progress: bool) -> bool:
    """Progress bars are off when asked, or when ``$TQDM_DISABLE`` is set (as in ``make test``/``make demo``),
    which an explicit ``disable=False`` would otherwise override."""
    return not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """The dataset in its own order (evaluation, feature caching)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=0,
                      generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def extract_features(model: AnomalyModel, dataset: Dataset, batch_size: int = 16,
                     device: str | torch.device | None = None, progress: bool = True,
                     desc: str = "features") -> FeatureSet:
    """Run ``model.extract`` over ``dataset`` once and keep the results (on the CPU)."""
    device = get_device(device)
    model.to(device).eval()
    chunks: list[list[Tensor]] = []
    class_ids, labels, masks = [], [], []
    categories, defects, paths = [], [], []
    seconds = 0.0
    for batch in tqdm(_loader(dataset, batch_size), desc=desc, disable=_no_bar(progress), leave=False):
        images = batch["image"].to(device)
        _sync(device)
        t0 = time.perf_counter()
        feats = model.extract(images)
        _sync(device)
        seconds += time.perf_counter() - t0
        chunks.append([f.detach().cpu() for f in feats])
        class_ids.append(torch.as_tensor(batch.get("class_id", torch.zeros(len(images), dtype=torch.long))))
        labels.append(torch.as_tensor(batch["label"]))
        masks.append((batch["mask"][:, 0] > 0.5).to(torch.uint8))
        categories += list(batch["category"])
        defects += list(batch["defect"])
        paths += list(batch["path"])
    if not chunks:
        raise ValueError(f"The dataset given to extract_features ({type(dataset).__name__}) is empty.")
    features = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
    return FeatureSet(features, torch.cat(class_ids).long(), torch.cat(labels).long(), torch.cat(masks),
                      categories, defects, paths, seconds)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _check_finite(loss: float, model: AnomalyModel, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        cfg = model.config
        raise NonFiniteLossError(
            f"{model.method}: the loss became {loss} at epoch {epoch}, step {step}. Try a lower "
            f"learning rate (lr={cfg.lr}), gradient clipping (grad_clip={cfg.grad_clip}), a smaller soft "
            f"clamp, or check the input features for NaN/inf. Nothing was written for this run.")


def fit(model: AnomalyModel, train: Dataset | FeatureSet, *, epochs: int | None = None,
        batch_size: int | None = None, device: str | torch.device | None = None, seed: int = 0,
        eval_set: Dataset | FeatureSet | None = None, eval_every: int | None = None,
        progress: bool = True) -> list[dict[str, Any]]:
    """Train ``model`` and return its history (one dict per epoch: loss, and metrics when evaluated).

    Args:
        model: a registered :class:`~flowlib.models.base.AnomalyModel`.
        train: a dataset of sample dicts, or cached features from :func:`extract_features`. A dataset is
            turned into cached features first when ``model.config.cache_features`` is true.
        epochs, batch_size: default to the model's config.
        seed: seeds the shuffling (the model's weights are seeded by whoever built it).
        eval_set, eval_every: evaluate every ``eval_every`` epochs (and after the last one) and put the
            metrics into the history. Selecting a model on these numbers is selection on test data;
            :func:`run` therefore reports the last epoch and labels the best one as such.
    """
    cfg = model.config
    epochs = cfg.epochs if epochs is None else epochs
    batch_size = cfg.batch_size if batch_size is None else batch_size
    device = get_device(device)
    model.to(device)
    if not isinstance(train, FeatureSet) and cfg.cache_features:
        train = extract_features(model, train, batch_size, device, progress, desc="caching features")
    if eval_every and eval_set is not None and not isinstance(eval_set, FeatureSet) and cfg.cache_features:
        eval_set = extract_features(model, eval_set, batch_size, device, progress, desc="caching test")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    optimizer, scheduler = model.configure_optimizers(steps_per_epoch)
    params = model.trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    bar = tqdm(range(1, epochs + 1), desc=f"training {model.method}", disable=_no_bar(progress))
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        # one shuffled order for both paths: cached and live training see the same batches
        order = torch.randperm(len(train), generator=generator)
        if isinstance(train, FeatureSet):
            batches = ((f, c) for f, c, _ in train.batches(batch_size, order=order))
        else:
            loader = DataLoader(train, batch_size=batch_size, sampler=order.tolist(), num_workers=0,
                                generator=torch.Generator().manual_seed(seed + epoch))  # not the global RNG
            batches = ((model.extract(b["image"].to(device)), b["class_id"]) for b in loader)
        for step, (feats, class_ids) in enumerate(batches):
            feats = [f.to(device, non_blocking=True) for f in feats]
            loss = model.loss(feats, torch.as_tensor(class_ids).to(device))
            value = loss.item()  # the step's one read from the device: checked here, summed below
            _check_finite(value, model, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += value * len(class_ids)
            count += len(class_ids)
        entry: dict[str, Any] = {"epoch": epoch, "loss": total / max(count, 1)}
        if eval_set is not None and eval_every and (epoch % eval_every == 0 or epoch == epochs):
            entry["metrics"] = evaluate(model, eval_set, device=device, progress=False).metrics
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
    return history


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: image_auroc, pixel_auroc, aupro, image_f1, pixel_f1 over the whole set.
        per_category: the same metrics for each category present.
        maps: ``(N, H, W)`` anomaly maps (higher = more anomalous); scores: ``(N,)``.
        labels: ``(N,)``; masks: ``(N, H, W)`` uint8; categories, defects, paths: per sample.
        ms_per_image: backbone + head time per image (data loading excluded; backbone time
            included only when features were not cached beforehand).
    """

    metrics: dict[str, float]
    per_category: dict[str, dict[str, float]]
    maps: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor
    categories: list[str]
    defects: list[str]
    paths: list[str]
    ms_per_image: float


@torch.inference_mode()  # a little cheaper than no_grad; nothing computed here is ever trained on
def evaluate(model: AnomalyModel, test: Dataset | FeatureSet, *, device: str | torch.device | None = None,
             batch_size: int | None = None, progress: bool = True) -> EvalResult:
    """Anomaly maps, image scores and metrics of ``model`` on a test set (dataset or cached features)."""
    device = get_device(device)
    batch_size = batch_size or model.config.batch_size
    model.to(device).eval()
    maps, scores = [], []
    seconds = 0.0
    if isinstance(test, FeatureSet):
        fs = test
        size = tuple(fs.masks.shape[-2:])
        for feats, class_ids, _ in fs.batches(batch_size):
            feats = [f.to(device) for f in feats]
            _sync(device)
            t0 = time.perf_counter()
            m, s = model.predict(feats, size, class_ids.to(device))
            _sync(device)
            seconds += time.perf_counter() - t0
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        seconds += fs.seconds
        labels, masks, class_ids_all = fs.labels, fs.masks, fs.class_ids
        categories, defects, paths = fs.categories, fs.defects, fs.paths
    else:
        labels_l, masks_l, ids_l = [], [], []
        categories, defects, paths = [], [], []
        batches = _loader(test, batch_size)
        for batch in tqdm(batches, desc="evaluating", disable=_no_bar(progress), leave=False):
            images = batch["image"].to(device)
            class_ids = torch.as_tensor(batch.get("class_id", torch.zeros(len(images), dtype=torch.long)))
            _sync(device)
            t0 = time.perf_counter()
            m, s = model.predict(model.extract(images), tuple(images.shape[-2:]), class_ids.to(device))
            _sync(device)
            seconds += time.perf_counter() - t0
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
            labels_l.append(torch.as_tensor(batch["label"]))
            masks_l.append((batch["mask"][:, 0] > 0.5).to(torch.uint8))
            ids_l.append(class_ids)
            categories += list(batch["category"])
            defects += list(batch["defect"])
            paths += list(batch["path"])
        labels, masks, class_ids_all = torch.cat(labels_l).long(), torch.cat(masks_l), torch.cat(ids_l).long()
    all_maps, all_scores = model.finalize(torch.cat(maps), torch.cat(scores), class_ids_all)
    per_category = {}
    for cat in dict.fromkeys(categories):
        idx = torch.tensor([i for i, c in enumerate(categories) if c == cat])
        per_category[cat] = _metrics(labels[idx], all_scores[idx], masks[idx], all_maps[idx])
    overall = (next(iter(per_category.values())) if len(per_category) == 1
               else {k: float(np.mean([v[k] for v in per_category.values()])) for k in _metric_keys()})
    return EvalResult(overall, per_category, all_maps, all_scores, labels, masks, categories, defects, paths,
                      1000.0 * seconds / max(len(labels), 1))


def _metric_keys() -> tuple[str, ...]:
    return ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")


def _metrics(labels: Tensor, scores: Tensor, masks: Tensor, maps: Tensor) -> dict[str, float]:
    """Image metrics always; pixel metrics only when the set has ground-truth defect pixels."""
    has_masks = bool(masks.any())
    values = M.compute_metrics(labels.numpy(), scores.numpy(), masks.numpy() if has_masks else None,
                               maps.numpy() if has_masks else None)
    return {k: float(values[k]) for k in _metric_keys() if k in values}


def _versions() -> dict[str, str]:
    import flowlib

    return {"flowlib": flowlib.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _categories(dataset: str, categories: str | Sequence[str] | None, root: str | None) -> list[str]:
    from flowlib.data import list_categories

    available = list_categories(dataset, root)
    if categories in (None, "all"):
        return list(available)
    chosen = [c.strip() for c in categories.split(",")] if isinstance(categories, str) else list(categories)
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise ValueError(f"Unknown {dataset} categories {unknown}; available: {list(available)}.")
    return chosen


def _history_best(history: list[dict[str, Any]]) -> dict[str, float]:
    evaluated = [h["metrics"] for h in history if "metrics" in h]
    if not evaluated:
        return {}
    return {k: max(m[k] for m in evaluated) for k in evaluated[-1]}


def record_run(model: AnomalyModel, result: EvalResult, history: list[dict[str, Any]], *, method: str,
               dataset: str, preset: str, seed: int, train_seconds: float,
               device: str | torch.device | None = None,
               out: str | os.PathLike | None = None, examples: bool = True) -> list[dict[str, Any]]:
    """Write the results of one trained model: one JSON record per category in ``result``.

    The record holds the metrics of the last epoch, the best of the periodic evaluations in ``history``
    (``best_on_test``, reported separately), timings, trainable parameters, the device, the configuration
    and library versions. With ``examples`` a small ``.examples.npz`` beside each JSON keeps the anomaly
    maps of a few fixed test images (see :func:`flowlib.results.save_examples`) so that other notebooks
    can show them without the model. Used by :func:`run` and by notebooks that train with their own loop;
    returns the records (each with its ``"_path"``).
    """
    from flowlib.results import save_examples

    device_t = get_device(device)
    group = list(dict.fromkeys(result.categories))
    records = []
    for cat in group:
        record = {
            "method": method, "dataset": dataset, "category": cat, "preset": preset, "seed": seed,
            "unified_over": group if len(group) > 1 else None,
            "metrics": result.per_category[cat],
            "best_on_test": _history_best(history),
            "history": history,
            "timing": {"train_seconds_total": train_seconds, "train_categories": len(group),
                       "inference_ms_per_image": result.ms_per_image,
                       "trainable_parameters": model.num_trainable_parameters()},
            "device": _device_name(device_t),
            "config": model.config.to_dict(),
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = write_result(record, out)
        record["_path"] = str(path)
        if examples:
            idx = [i for i, x in enumerate(result.categories) if x == cat]
            save_examples(path, result.maps[idx], result.masks[idx], result.labels[idx], result.scores[idx],
                          [result.defects[i] for i in idx], [result.paths[i] for i in idx])
        records.append(record)
    return records


def run(method: str, *, dataset: str = "demo", categories: str | Sequence[str] | None = "all",
        preset: str = "quick", seed: int = 0, root: str | None = None, out: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None, device: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
        keep_results: bool = False) -> list[dict[str, Any]]:
    """Train and evaluate ``method`` on ``dataset`` and write one JSON result per category.

    One model per category, or a single model over all chosen categories when the method is unified
    (``model.unified``). Returns the records written (with the :class:`EvalResult` under ``"eval"`` and the
    trained model under ``"model"`` when ``keep_results`` is true). ``overrides`` change preset settings
    (e.g. ``{"epochs": 2}``).
    """
    from flowlib.data import MultiCategoryDataset, load_dataset

    spec = method_spec(method)
    base_cfg = get_config(method, preset, **(overrides or {}))
    device_t = get_device(device)
    cats = _categories(dataset, categories, root)
    groups = [cats] if spec.model_cls.unified else [[c] for c in cats]
    records = []
    for group in groups:
        cfg = base_cfg
        size_overrides = getattr(cfg, "input_size_overrides", None) or {}
        if len(group) == 1 and group[0] in size_overrides:
            cfg = cfg.replace(input_size=int(size_overrides[group[0]]))
        if hasattr(cfg, "n_classes"):
            cfg = cfg.replace(n_classes=len(group))
        seed_everything(seed)
        model = build_model(method, config=cfg)
        train_sets = [load_dataset(dataset, c, "train", root=root, image_size=cfg.input_size) for c in group]
        test_sets = [load_dataset(dataset, c, "test", root=root, image_size=cfg.input_size) for c in group]
        train = train_sets[0] if len(group) == 1 else MultiCategoryDataset(train_sets)
        test = test_sets[0] if len(group) == 1 else MultiCategoryDataset(test_sets)
        t0 = time.perf_counter()
        if cfg.cache_features:
            train = extract_features(model, train, cfg.batch_size, device_t, progress,
                                     desc="caching features")
        if cfg.eval_every and cfg.cache_features:
            test = extract_features(model, test, cfg.batch_size, device_t, progress, desc="caching test")
        history = fit(model, train, device=device_t, seed=seed, eval_set=test, eval_every=cfg.eval_every,
                      progress=progress)
        train_s = time.perf_counter() - t0
        result = evaluate(model, test, device=device_t, progress=progress)
        label = "+".join(group) if len(group) > 1 else group[0]
        if checkpoint_dir is not None:
            thresholds = {}
            for cat in group:
                idx = [i for i, x in enumerate(result.categories) if x == cat]
                thresholds[cat] = M.threshold_at_best_f1(result.labels[idx].numpy(),
                                                         result.scores[idx].numpy())
            extra = {"categories": group, "dataset": dataset, "seed": seed, "image_threshold": thresholds,
                     "image_threshold_source": "best F1 on the test set of this run"}
            name = f"{label}_{preset}_seed{seed}.pt"
            save_checkpoint(model, Path(checkpoint_dir) / method / dataset / name, extra)
        written = record_run(model, result, history, method=method, dataset=dataset, preset=preset, seed=seed,
                             train_seconds=train_s, device=device_t, out=out)
        for record in written:
            if keep_results:
                record["eval"] = result
                record["model"] = model
            records.append(record)
    return records


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    import json

    from flowlib.results import _json_default

    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def ensure_results(method: str, *, dataset: str = "demo", categories: str | Sequence[str] | None = "all",
                   preset: str = "quick", seed: int = 0, root: str | None = None,
                   out: str | os.PathLike | None = None, progress: bool = True
                   ) -> tuple[list[dict[str, Any]], bool]:
    """The results of ``method`` on every chosen category, trained only where they are missing or stale.

    A stored record is reused when it exists for every category and its configuration equals the preset's
    current one (so editing a preset invalidates old results); otherwise :func:`run` trains them all again.
    Returns ``(records, trained)``.
    """
    from flowlib.results import load_results

    cats = _categories(dataset, categories, root)
    wanted = _comparable(get_config(method, preset).to_dict())
    found = load_results(out, method=method, dataset=dataset, preset=preset, seed=seed)
    stored = {r["category"]: r for r in found}

    def fresh(record: dict[str, Any] | None) -> bool:
        if record is None:
            return False
        have = record.get("config", {})
        # the class count of unified models, and input sizes a preset sets per category, are set by `run`
        ignore = {"n_classes"} | ({"input_size"} if wanted.get("input_size_overrides") else set())
        return all(have.get(k) == v for k, v in wanted.items() if k not in ignore)

    if all(fresh(stored.get(c)) for c in cats):
        return [stored[c] for c in cats], False
    return run(method, dataset=dataset, categories=cats, preset=preset, seed=seed, root=root, out=out,
               progress=progress), True
