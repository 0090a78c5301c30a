"""The contract between a method and the shared engine, and the method registry.

A method is an :class:`AnomalyModel` (an ``nn.Module``) plus a config dataclass and named presets.
The engine only ever calls the five methods below, so every paper trains and evaluates through one
loop (:mod:`flowlib.engine`)::

    features = model.extract(images)                # frozen backbone, cacheable
    loss = model.loss(features, class_ids)          # training objective (a scalar)
    maps, scores = model.predict(features, size)    # anomaly maps (B, H, W) and image scores (B,)
    maps, scores = model.finalize(maps, scores, class_ids)  # whole-test-set post-processing
    optimizer, scheduler = model.configure_optimizers(steps_per_epoch)

Higher map values mean "more anomalous" for every method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

Features = list[Tensor]

# device types whose fused Adam kernel this torch ships: CUDA since torch 2.0, the CPU since torch 2.4
# (the declared range starts at 2.1, where fused=True on CPU parameters raises)
# (torch.__version__ is a TorchVersion: ">=" compares versions, so 2.14 counts as newer than 2.4)
_FUSED_ADAM_DEVICES = ("cpu", "cuda") if torch.__version__ >= "2.4" else ("cuda",)


def adam(params: Any, **kwargs: Any) -> torch.optim.Adam:
    """``torch.optim.Adam`` with PyTorch's fused kernel where every parameter allows it.

    The fused kernel updates each parameter in one pass instead of a dozen elementwise ops; on a CPU
    it makes the step 4-8× faster (2.1 s → 0.27 s for CS-Flow's 275 M parameters) and agrees with the
    default implementation up to float rounding (``tests/test_optimizer.py``). Parameters on other
    devices, or not floating point, get the default implementation.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.Adam``.
        **kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ... (``fused`` overrides the choice).
    """
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = bool(tensors) and all(
            p.device.type in _FUSED_ADAM_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(groups, **kwargs)


@dataclass
class MethodConfig:
    """Settings every method has. Methods subclass it with their own fields.

    Attributes:
        backbone: backbone name understood by :class:`flowlib.backbones.FeatureExtractor`.
        input_size: side of the square network input in pixels.
        epochs, batch_size, lr, weight_decay: the optimisation schedule.
        grad_clip: max gradient norm (``None`` = no clipping).
        pretrained: load the backbone's ImageNet weights (an error if they cannot be had).
        cache_features: extract frozen-backbone features once and train on them.
        eval_every: also evaluate every N epochs (history with "last" and "best"); ``None`` = at the end.
    """

    backbone: str = "efficientnet_lite0"
    input_size: int = 128
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    pretrained: bool = True
    cache_features: bool = True
    eval_every: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> MethodConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Unknown setting(s) {sorted(unknown)} for {type(self).__name__}; "
                             f"known: {sorted(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **changes)


class AnomalyModel(nn.Module):
    """Base class of every method. Subclasses set ``method`` and implement the abstract methods.

    Attributes:
        method: registry name (``"fastflow"``, ...).
        unified: ``True`` when one model is trained on all categories at once (HGAD); the engine then
            builds one training set over the categories and passes ``class_ids``.
        config: the :class:`MethodConfig` the model was built from.
        backbone: the frozen feature extractor (its weights are not stored in checkpoints).
    """

    method: ClassVar[str] = ""
    unified: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    # -- the five calls the engine makes -------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Frozen feature extraction: images ``(B, 3, H, W)`` in [0, 1] → list of tensors."""
        return self.backbone(images)

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        """Training objective on a batch of (cached) features; a scalar."""
        raise NotImplementedError

    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Anomaly maps ``(B, H, W)`` at ``image_size`` and image scores ``(B,)`` (higher = anomalous)."""
        raise NotImplementedError

    def finalize(self, maps: Tensor, scores: Tensor, class_ids: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Post-process the maps and scores of a whole test set (``(N, H, W)``, ``(N,)``).

        The default leaves them unchanged; methods that normalise over the test set override it.
        """
        return maps, scores

    def configure_optimizers(self, steps_per_epoch: int
                             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """Optimizer over the trainable parameters and an optional scheduler stepped every iteration."""
        cfg = self.config
        return adam(self.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), None

    def compile_inference(self, **options: Any) -> AnomalyModel:
        """Compile :meth:`extract` and :meth:`predict` with ``torch.compile``; returns ``self``.

        Everything that calls them (:func:`flowlib.engine.evaluate`, :func:`flowlib.predict.predict_images`,
        the benchmarks) then runs the compiled versions. The first call for each new input shape
        compiles (about 1-2 min for a quick preset on two CPU cores with an empty compiler cache; a
        smaller last batch is a new shape), so it pays off when many images are scored, not for one
        quick-mode test set. Measured with one CPU thread at batch 1 (``benchmarks/results/bench_cpu.md``):
        the quick presets ran 1.2-1.6× faster. Outputs agree with the eager model up to float rounding
        (``tests/test_compile.py``). Training is not compiled. Call it once per model: a second call
        would compile the compiled functions again.

        Args:
            **options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``dynamic=True``).
        """
        self.extract = torch.compile(self.extract, **options)  # instance attributes shadow the methods
        self.predict = torch.compile(self.predict, **options)
        return self

    # -- helpers -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def head_state_dict(self) -> dict[str, Tensor]:
        """State dict without the frozen backbone (what checkpoints store)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def train(self, mode: bool = True) -> AnomalyModel:
        super().train(mode)
        backbone = getattr(self, "backbone", None)
        if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
            backbone.eval()  # a frozen backbone stays in eval mode (BatchNorm statistics fixed)
        return self


@dataclass
class MethodSpec:
    """A registered method: its model class, config class and named presets."""

    name: str
    model_cls: type[AnomalyModel]
    config_cls: type[MethodConfig]
    presets: dict[str, MethodConfig] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[MethodConfig], presets: dict[str, MethodConfig],
                    description: str = "") -> Callable[[type[AnomalyModel]], type[AnomalyModel]]:
    """Class decorator that makes a model available to the engine and the command line.

    Presets must include ``"quick"`` (CPU, built-in data) and ``"paper"`` (the paper's setting).
    """
    missing = {"quick", "paper"} - set(presets)
    if missing:
        raise ValueError(f"Method {name!r} must define presets {sorted(missing)}.")

    def wrap(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        cls.method = name
        _REGISTRY[name] = MethodSpec(name, cls, config_cls, dict(presets), description)
        return cls

    return wrap


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        _import_builtin_methods(only=name)
    if name not in _REGISTRY:
        _import_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"Unknown method {name!r}; available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def get_config(name: str, preset: str = "quick", **overrides: Any) -> MethodConfig:
    """The config of ``preset`` for method ``name``, with ``overrides`` applied."""
    spec = method_spec(name)
    if preset not in spec.presets:
        raise KeyError(f"Method {name!r} has no preset {preset!r}; presets: {sorted(spec.presets)}.")
    return spec.presets[preset].replace(**overrides)


def build_model(name: str, preset: str = "quick", config: MethodConfig | None = None,
                **overrides: Any) -> AnomalyModel:
    """Build a registered method from a preset (or an explicit config) plus overrides."""
    spec = method_spec(name)
    if config is None:
        config = get_config(name, preset, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    if not isinstance(config, spec.config_cls):
        config = spec.config_cls(**config.to_dict()) if isinstance(config, MethodConfig) else config
    return spec.model_cls(config)


def config_from_dict(name: str, values: dict[str, Any]) -> MethodConfig:
    """Rebuild a method's config from the plain dict stored in a checkpoint or result file."""
    spec = method_spec(name)
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    return spec.config_cls(**{k: (tuple(v) if isinstance(v, list) else v)
                              for k, v in values.items() if k in known})


def _import_builtin_methods(only: str | None = None) -> None:
    """Import the method modules (or just ``only``) so that their ``@register_method`` decorators run."""
    import importlib
    import pkgutil

    import flowlib.models as pkg

    names = [info.name for info in pkgutil.iter_modules(pkg.__path__) if info.name != "base"]
    for name in names:
        if only is None or name == only:
            importlib.import_module(f"flowlib.models.{name}")
