"""What a GPU run depends on, checked without a GPU.

* **Reads from the device.** Every ``.item()``, ``float(t)``, ``bool(t)`` or ``.tolist()`` of a tensor
  that lives on a GPU makes the host wait until the GPU has caught up, so a training step should read
  as little as it can: the methods' steps read nothing, HGAD's reads its input-norm flag, the class-id
  range once per level and its logged loss terms once, and ``engine.fit`` reads the loss once per step.
  On a CPU the same reads are counted: ``.item()``/``float``/``bool`` go through the dispatcher as
  ``aten::_local_scalar_dense``, ``.tolist()`` is counted by wrapping ``Tensor.tolist``.
* **One device for every tensor.** On PyTorch's ``meta`` device tensors have shapes but no values.
  Running a method with its weights and inputs on ``meta``, while :class:`OneDevice` checks that no
  operation gets tensors from two devices, finds any tensor the code creates on the CPU by default:
  the mistake that breaks a GPU run at its first step. HGAD is left out: its training step reads
  values (above), which ``meta`` tensors do not have.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from flowlib import engine
from flowlib.config import seed_everything
from flowlib.models import build_model
from flowlib.models.base import adam

#: Methods whose built-in sizes allow 64 px inputs; CS-Flow's 3-scale pyramid needs a multiple of 128.
SIZES = {"fastflow": 64, "msflow": 64, "gaussian": 64, "hgad": 64, "csflow": 128}


class DeviceReads(TorchDispatchMode):
    """Counts the host's reads of tensor values while active (see the module docstring).

    ``Tensor.tolist`` is wrapped for as long as the mode is active, since the dispatcher does not see it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.counts["item"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.counts["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def total(self) -> int:
        return sum(self.counts.values())


class OneDevice(TorchDispatchMode):
    """Fails any operation whose tensor arguments lie on different devices.

    PyTorch lets ``meta`` mix with the CPU in some operations (matrix products, convolutions) that would
    fail between a GPU and the CPU, so the check is made here for every operation. A 0-dim CPU tensor
    is allowed anywhere, as PyTorch allows it on a GPU.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.ndim == 0 and t.device.type == "cpu")}
        assert len(devices) <= 1, f"{func} got tensors on {sorted(map(str, devices))}"
        return func(*args, **kwargs)


def _model_and_features(method: str, batch: int = 2):
    seed_everything(0)
    size = SIZES[method]
    model = build_model(method, "quick", pretrained=False, input_size=size)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.extract(images)
    return model, feats, torch.zeros(batch, dtype=torch.long)


def _step(model, feats, class_ids, optimizer) -> None:
    loss = model.loss(feats, class_ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", ["fastflow", "csflow", "msflow", "gaussian"])
def test_a_training_step_reads_nothing_from_the_device(method):
    model, feats, ids = _model_and_features(method)
    model.train()
    optimizer = adam(model.trainable_parameters(), lr=1e-4)
    _step(model, feats, ids, optimizer)  # first step outside the count (lazy set-up is allowed)
    count_reads = DeviceReads()
    with count_reads:
        _step(model, feats, ids, optimizer)
    assert count_reads.total() == 0, dict(count_reads.counts)


@pytest.mark.parametrize("stage_two", [False, True])
def test_hgad_training_step_reads_the_device_a_few_times_only(stage_two):
    model, feats, _ = _model_and_features("hgad")
    ids = torch.tensor([0, model.config.n_classes - 1])
    model.train()
    model.set_epoch(model.config.intra_start_epoch if stage_two else 0)
    optimizer = adam(model.trainable_parameters(), lr=1e-4)
    _step(model, feats, ids, optimizer)
    count_reads = DeviceReads()
    with count_reads:
        _step(model, feats, ids, optimizer)
    # the input-norm flag, the class-id range per level, the logged terms: 15 reads per step before
    # (23 in stage two, with two levels), one per term and level and two per label check and one-hot
    assert count_reads.total() == 2 + len(feats), dict(count_reads.counts)
    assert ("L_g_intra" in model.last_terms) == stage_two


def test_hgad_still_names_a_class_id_out_of_range():
    model, feats, _ = _model_and_features("hgad")
    model.train()
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, "):
        model.loss(feats, torch.tensor([0, model.config.n_classes]))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, "):
        model.loss(feats, torch.tensor([-1, 0]))


def test_fit_reads_the_loss_once_per_step():
    model, feats, ids = _model_and_features("fastflow", batch=2)
    data = engine.FeatureSet([f.repeat(3, 1, 1, 1) for f in feats], ids.repeat(3), torch.zeros(6).long(),
                             torch.zeros(6, 1, 1, 1), ["c"] * 6, ["good"] * 6, [f"{i}.png" for i in range(6)],
                             0.0)
    count_reads = DeviceReads()
    with count_reads:
        engine.fit(model, data, epochs=1, batch_size=2, progress=False)
    assert count_reads.total() == 3, dict(count_reads.counts)  # 3 steps, one read each


@pytest.mark.parametrize("method", ["fastflow", "csflow", "msflow", "gaussian"])
def test_every_tensor_stays_on_the_model_device(method):
    """Backbone, loss, backward pass (its operations run in this thread on ``meta`` and are checked too)
    and prediction."""
    size = SIZES[method]
    model = build_model(method, "quick", pretrained=False, input_size=size).to("meta")
    images = torch.rand(2, 3, size, size, device="meta")
    with OneDevice():
        feats = model.extract(images)
        model.train()
        loss = model.loss(feats, torch.zeros(2, dtype=torch.long, device="meta"))
        loss.backward()
        model.eval()
        with torch.inference_mode():
            maps, scores = model.predict(feats, (size, size))
    assert all(f.is_meta for f in feats) and loss.is_meta
    assert all(p.grad is not None and p.grad.is_meta for p in model.trainable_parameters() if p.requires_grad)
    assert maps.is_meta and tuple(maps.shape) == (2, size, size) and tuple(scores.shape) == (2,)


def test_the_device_check_catches_a_cpu_tensor_in_a_matrix_product():
    """PyTorch itself lets this pass on ``meta``; :class:`OneDevice` does not."""
    left, right = torch.rand(3, 3), torch.rand(3, 3, device="meta")
    assert (left @ right).device.type == "cpu"  # no error from PyTorch
    with pytest.raises(AssertionError, match="got tensors on"), OneDevice():
        left @ right
