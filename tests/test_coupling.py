"""The shared invertible blocks: equality with FrEIA 0.2, invertibility, exact log-dets, pickling."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from flowcheck import jacobian_log_det, randomize
from FrEIA.modules import AllInOneBlock

from flowlib.coupling import (
    AllInOneCoupling,
    ChannelPermutation,
    MultiScaleDoubleCoupling,
    SequentialFlow,
    atan_clamp,
    tanh_clamp,
)
from flowlib.subnets import conv_subnet, mlp_subnet, per_scale_subnet


def _freia_pair(channels: int, spatial: tuple[int, ...], subnet, cond_channels: int = 0,
                permute_soft: bool = False, seed: int = 0) -> tuple[AllInOneBlock, AllInOneCoupling]:
    np.random.seed(seed)  # FrEIA draws its permutation from NumPy
    torch.manual_seed(seed)
    dims_c = [(cond_channels, *spatial)] if cond_channels else []
    ref = AllInOneBlock([(channels, *spatial)], dims_c=dims_c, subnet_constructor=subnet,
                        affine_clamping=2.0, permute_soft=permute_soft)
    randomize(ref.subnet, seed + 1, scale=0.5)
    with torch.no_grad():
        ref.global_scale.add_(0.3 * torch.randn(ref.global_scale.shape))
        ref.global_offset.normal_()
    ours = AllInOneCoupling(channels, subnet, cond_channels=cond_channels, clamp=2.0,
                            permute_soft=permute_soft).load_freia_block(ref)
    return ref, ours


# --------------------------------------------------------------------------------------------------
# AllInOneCoupling == FrEIA 0.2 AllInOneBlock
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [6, 7])  # odd C exercises the unequal split C - C//2, C//2
@pytest.mark.parametrize("permute_soft", [False, True])
def test_allinone_matches_freia_2d(channels: int, permute_soft: bool) -> None:
    ref, ours = _freia_pair(channels, (5, 4), conv_subnet(3, hidden_ratio=1.0), permute_soft=permute_soft)
    ref, ours = ref.double(), ours.double()
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    (y_ref,), ld_ref = ref([x])
    y, ld = ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)
    (x_ref,), ldi_ref = ref([y_ref], rev=True)
    x_back, ldi = ours(y, reverse=True)
    torch.testing.assert_close(x_back, x_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ldi, ldi_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("permute_soft", [False, True])
def test_allinone_matches_freia_conditional(permute_soft: bool) -> None:
    ref, ours = _freia_pair(8, (3, 3), conv_subnet(1, hidden_ratio=2.0), cond_channels=4,
                            permute_soft=permute_soft, seed=3)
    x, c = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3)
    (y_ref,), ld_ref = ref([x], c=[c])
    y, ld = ours(x, cond=c)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-4)
    (x_ref,), _ = ref([y_ref], c=[c], rev=True)
    torch.testing.assert_close(ours(y, cond=c, reverse=True)[0], x_ref, rtol=1e-5, atol=1e-5)


def test_allinone_matches_freia_vectors_with_condition() -> None:
    # the 1-D per-position form used by CFLOW/HGAD: (N, C) samples, MLP subnet, soft permutation
    ref, ours = _freia_pair(10, (), mlp_subnet(2.0), cond_channels=6, permute_soft=True, seed=5)
    x, c = torch.randn(16, 10), torch.randn(16, 6)
    (y_ref,), ld_ref = ref([x], c=[c])
    y, ld = ours(x, cond=c)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)


def test_load_freia_rejects_soft_permutation_into_hard_block() -> None:
    np.random.seed(0)
    ref = AllInOneBlock([(4, 3, 3)], subnet_constructor=conv_subnet(3), permute_soft=True)
    with pytest.raises(ValueError, match="permute_soft=True"):
        AllInOneCoupling(4, conv_subnet(3)).load_freia_block(ref)


# --------------------------------------------------------------------------------------------------
# AllInOneCoupling on its own
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("permute_soft", [False, True])
def test_allinone_log_det_equals_autograd_jacobian(permute_soft: bool) -> None:
    torch.manual_seed(0)
    block = AllInOneCoupling(5, conv_subnet(3), permute_soft=permute_soft, clamp=2.0)
    randomize(block, 1, scale=0.5).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    _, log_det = block(x)
    torch.testing.assert_close(log_det, jacobian_log_det(lambda v: block(v)[0], x))
    y, _ = block(x)
    _, log_det_inv = block(y, reverse=True)
    torch.testing.assert_close(log_det_inv, jacobian_log_det(lambda v: block(v, reverse=True)[0], y))


def test_allinone_conditional_log_det_and_inverse() -> None:
    torch.manual_seed(0)
    block = randomize(AllInOneCoupling(4, conv_subnet(1), cond_channels=3), 2, scale=0.5).double()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    c = torch.randn(1, 3, 3, 2, dtype=torch.float64)  # one condition broadcast over the batch
    y, log_det = block(x, cond=c)
    back, log_det_inv = block(y, cond=c, reverse=True)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(log_det, jacobian_log_det(lambda v: block(v, cond=c)[0], x))
    with pytest.raises(ValueError, match="cond="):
        block(x)


def test_allinone_clamp_bounds_the_log_scale() -> None:
    # a huge subnet output cannot push |s| beyond the clamp: log-det ≤ α · (#transformed entries)
    torch.manual_seed(0)
    block = AllInOneCoupling(4, conv_subnet(1), clamp=0.7)
    with torch.no_grad():
        for p in block.subnet.parameters():
            p.fill_(50.0)
    x = torch.rand(2, 4, 3, 3) + 1.0
    _, log_det = block(x)
    n_transformed = 2 * 3 * 3
    assert torch.all(log_det <= 0.7 * n_transformed + 1e-4)
    assert torch.all(log_det >= 0.7 * n_transformed * 0.99)  # saturated, not silently zero


def test_allinone_hard_permutation_is_a_gather() -> None:
    torch.manual_seed(0)
    block = AllInOneCoupling(6, conv_subnet(3))
    assert sorted(block.perm.tolist()) == list(range(6))
    assert torch.equal(block.perm[block.inv_perm], torch.arange(6))
    assert not any(name.endswith("rotation") and b is not None for name, b in block.named_buffers())


@pytest.mark.parametrize("n", [1, 64, 515])
def test_soft_rotation_of_vectors_equals_the_general_product(n: int) -> None:
    """Vectors ``(N, C)`` are rotated by one matrix product; values and input gradients must equal those
    of the einsum used for maps, bit for bit, both ways."""
    block = AllInOneCoupling(112, mlp_subnet(2.0), permute_soft=True,
                             generator=torch.Generator().manual_seed(2))
    u = torch.randn(n, 112, generator=torch.Generator().manual_seed(3), requires_grad=True)
    u_ref = u.detach().clone().requires_grad_(True)
    for inverse in (False, True):
        w = block.rotation.t() if inverse else block.rotation
        out, ref = block._mix(u, inverse), torch.einsum("oc,bc...->bo...", w, u_ref)
        assert torch.equal(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        assert torch.equal(u.grad, u_ref.grad)
        u.grad, u_ref.grad = None, None


def test_soft_rotation_is_orthogonal_with_det_one() -> None:
    block = AllInOneCoupling(9, conv_subnet(1), permute_soft=True, generator=torch.Generator().manual_seed(1))
    r = block.rotation.double()
    torch.testing.assert_close(r @ r.t(), torch.eye(9, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(torch.linalg.det(r)) - 1.0) < 1e-5


def test_allinone_generator_makes_permutation_reproducible() -> None:
    a = AllInOneCoupling(16, conv_subnet(1), generator=torch.Generator().manual_seed(7))
    b = AllInOneCoupling(16, conv_subnet(1), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.perm, b.perm)


def test_allinone_rejects_one_channel() -> None:
    with pytest.raises(ValueError, match="at least 2 channels"):
        AllInOneCoupling(1, conv_subnet(3))


def test_clamps() -> None:
    a = torch.tensor([-1e6, -1.0, 0.0, 1e-3, 1e6])
    assert torch.all(tanh_clamp(a, 2.0).abs() <= 2.0)
    assert torch.all(atan_clamp(a, 3.0).abs() < 3.0)
    # both are close to the identity (times the slope) near zero
    assert abs(float(tanh_clamp(torch.tensor(1e-3), 2.0)) - 2e-3) < 1e-8
    assert abs(float(atan_clamp(torch.tensor(1e-3), 3.0)) - 0.636e-3) < 1e-8


# --------------------------------------------------------------------------------------------------
# Pickling: FrEIA 0.2's block holds lambdas and cannot be saved whole; ours can
# --------------------------------------------------------------------------------------------------
def test_allinone_pickles_where_freia_does_not(tmp_path) -> None:
    np.random.seed(0)
    ref = AllInOneBlock([(4, 3, 3)], subnet_constructor=conv_subnet(3))
    with pytest.raises(Exception):  # noqa: B017 - the exact pickling error type varies
        pickle.dumps(ref)

    torch.manual_seed(0)
    flow = SequentialFlow([AllInOneCoupling(4, conv_subnet(3)), AllInOneCoupling(4, conv_subnet(1),
                                                                                  permute_soft=True)])
    x = torch.randn(2, 4, 3, 3)
    y = flow(x)[0]
    clone = pickle.loads(pickle.dumps(flow))
    torch.testing.assert_close(clone(x)[0], y)

    path = tmp_path / "flow.pt"
    torch.save(flow, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], y)

    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh = SequentialFlow([AllInOneCoupling(4, conv_subnet(3)),
                            AllInOneCoupling(4, conv_subnet(1), permute_soft=True)])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # the permutations travel as buffers
    torch.testing.assert_close(fresh(x)[0], y)


# --------------------------------------------------------------------------------------------------
# ChannelPermutation
# --------------------------------------------------------------------------------------------------
def test_channel_permutation_single_and_list() -> None:
    torch.manual_seed(0)
    perm = ChannelPermutation(5)
    x = torch.randn(2, 5, 3, 3)
    y, log_det = perm(x)
    assert torch.equal(log_det, torch.zeros(2))
    assert torch.equal(torch.sort(y, dim=1).values, torch.sort(x, dim=1).values)
    assert torch.equal(perm(y, reverse=True)[0], x)

    multi = ChannelPermutation([3, 4])
    xs = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)]
    ys, log_det = multi(xs)
    assert isinstance(ys, list) and [t.shape for t in ys] == [t.shape for t in xs]
    assert torch.equal(log_det, torch.zeros(2))
    assert all(torch.equal(a, b) for a, b in zip(multi(ys, reverse=True)[0], xs))


def test_permutations_move_channels_like_indexing_with_the_same_gradients() -> None:
    """The permutations gather with index_select; values and gradients equal x[:, perm] bit for bit."""
    torch.manual_seed(1)
    multi = ChannelPermutation([5, 3])
    block = AllInOneCoupling(6, conv_subnet(3))
    cases = [(lambda x: multi([x[:, :5], x[:, 5:]])[0], lambda x: [x[:, :5][:, multi.perm0],
                                                                  x[:, 5:][:, multi.perm1]]),
             (lambda x: [block._mix(x[:, :6], inverse=False)], lambda x: [x[:, :6][:, block.perm]]),
             (lambda x: [block._mix(x[:, :6], inverse=True)], lambda x: [x[:, :6][:, block.inv_perm]])]
    for permuted, indexed in cases:
        x = torch.randn(2, 8, 3, 3, requires_grad=True)
        got, want = permuted(x), indexed(x)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        weights = [torch.randn_like(w) for w in want]
        grad_got = torch.autograd.grad(sum((g * r).sum() for g, r in zip(got, weights)), x)[0]
        grad_want = torch.autograd.grad(sum((w * r).sum() for w, r in zip(want, weights)), x)[0]
        assert torch.equal(grad_got, grad_want)


# --------------------------------------------------------------------------------------------------
# MultiScaleDoubleCoupling
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [[4, 4], [5, 3]])
def test_multiscale_double_coupling_inverse_and_log_det(channels: list[int]) -> None:
    torch.manual_seed(0)
    block = MultiScaleDoubleCoupling(channels, per_scale_subnet(conv_subnet(3)), clamp=3.0)
    randomize(block, 4, scale=0.5).double()
    shapes = [(channels[0], 4, 4), (channels[1], 2, 2)]
    xs = [torch.randn(2, *s, dtype=torch.float64) for s in shapes]
    ys, log_det = block(xs)
    back, log_det_inv = block(ys, reverse=True)
    for a, b in zip(back, xs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    # both halves change in one block (unlike AllInOneCoupling)
    for x, y, c in zip(xs, ys, channels):
        assert not torch.allclose(x[:, : c // 2], y[:, : c // 2])
        assert not torch.allclose(x[:, c // 2:], y[:, c // 2:])
    expected = jacobian_log_det(lambda v: block(v)[0], xs)
    torch.testing.assert_close(log_det, expected)


def test_multiscale_double_coupling_output_clamp() -> None:
    torch.manual_seed(0)
    block = MultiScaleDoubleCoupling([2, 2], per_scale_subnet(conv_subnet(1)), output_clamp=0.5)
    with torch.no_grad():
        ys, _ = block([10 * torch.randn(1, 2, 3, 3), 10 * torch.randn(1, 2, 2, 2)])
    assert all(float(y.abs().max()) <= 0.5 for y in ys)


# --------------------------------------------------------------------------------------------------
# SequentialFlow
# --------------------------------------------------------------------------------------------------
def test_sequential_flow_tensor_chain() -> None:
    torch.manual_seed(0)
    flow = SequentialFlow([AllInOneCoupling(4, conv_subnet(k)) for k in (3, 1, 3)])
    randomize(flow, 6, scale=0.5).double()
    assert len(flow) == 3
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, log_det = flow(x)
    back, log_det_inv = flow(y, reverse=True)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(log_det, jacobian_log_det(lambda v: flow(v)[0], x))
    # the chain's log-det is the sum of its blocks'
    total, h = torch.zeros(2, dtype=torch.float64), x
    for block in flow.blocks:
        h, ld = block(h)
        total = total + ld
    torch.testing.assert_close(total, log_det)


def test_sequential_flow_list_chain() -> None:
    torch.manual_seed(0)
    flow = SequentialFlow([ChannelPermutation([4, 6]),
                           MultiScaleDoubleCoupling([4, 6], per_scale_subnet(conv_subnet(3))),
                           ChannelPermutation([4, 6]),
                           MultiScaleDoubleCoupling([4, 6], per_scale_subnet(conv_subnet(1)))])
    randomize(flow, 8, scale=0.3).double()
    shapes = [(4, 3, 3), (6, 2, 2)]
    xs = [torch.randn(2, *s, dtype=torch.float64) for s in shapes]
    ys, log_det = flow(xs)
    back, log_det_inv = flow(ys, reverse=True)
    for a, b in zip(back, xs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros(2, dtype=torch.float64))
    expected = jacobian_log_det(lambda v: flow(v)[0], xs)
    torch.testing.assert_close(log_det, expected)


def test_sequential_flow_passes_condition() -> None:
    torch.manual_seed(0)
    flow = SequentialFlow([AllInOneCoupling(6, mlp_subnet(1.0), cond_channels=2) for _ in range(3)])
    x, c = torch.randn(5, 6), torch.randn(5, 2)
    y, _ = flow(x, cond=c)
    torch.testing.assert_close(flow(y, cond=c, reverse=True)[0], x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flow(x, cond=-c)[0], y)  # the condition really enters the subnets
