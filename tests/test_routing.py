"""Routing and expert computation: the batched paths against literal references."""

from __future__ import annotations

import math

import pytest
import torch

from hilomoe.model import fused
from hilomoe.model.experts import LoRAExperts, sparse_rows_product
from hilomoe.model.layers import HiLoMoEProjection
from hilomoe.model.routing import (
    RoutingMode, hierarchical_route, hierarchical_route_reference, query_scale,
)


def make_layer(levels=4, experts=6, rank=1, top_k=2, d_in=12, d_out=10, learned=False,
               normalize=True) -> HiLoMoEProjection:
    layer = HiLoMoEProjection(d_in, d_out, levels, experts, rank, top_k, 0.7, learned, normalize)
    torch.nn.init.normal_(layer.bank.U, std=0.3)  # non-zero experts
    if learned:
        torch.nn.init.normal_(layer.router.weight, std=0.3)
    return layer


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_score_chained_routing_equals_literal_recurrence(sparse, learned, normalize):
    """The Gram-matrix routing pass equals q_{l+1} = q_l + s_l k_l computed level by level."""
    layer = make_layer(learned=learned, normalize=normalize).double()
    x = torch.randn(64, 12, dtype=torch.double)
    z = layer.bank.down(x)
    fast = layer.route(x, z, sparse)
    q1 = layer.router(x) if learned else x
    q1 = q1 * query_scale(x, normalize, 12) * math.sqrt(12)  # the reference scales by 1/sqrt(d)
    ref = hierarchical_route_reference(q1, layer.bank.keys(), 2, 0.7, sparse)
    torch.testing.assert_close(fast.scores, ref.scores)
    torch.testing.assert_close(fast.logits, ref.logits)
    assert torch.equal(fast.topk, ref.topk)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("mode", [RoutingMode.SPARSE, RoutingMode.DENSE])
def test_batched_levels_equal_loop_over_levels_and_experts(rank, mode):
    """All levels' experts in one batched computation == a loop over levels and experts."""
    layer = make_layer(rank=rank).double()
    layer.mode = mode
    x = torch.randn(32, 12, dtype=torch.double)
    y, routing = layer(x)
    expected = layer.base(x) + layer.bank.mixture_reference(x, routing.scores)
    torch.testing.assert_close(y, expected)


def test_next_level_routing_ignores_output_side_and_follows_keys():
    layer = make_layer(levels=3).double()
    x = torch.randn(128, 12, dtype=torch.double)
    before = layer(x)[1]
    U = layer.bank.U.data.view(3, 6, 1, 10)
    U[0] += torch.randn_like(U[0])  # perturb level 1's output side
    after_u = layer(x)[1]
    torch.testing.assert_close(after_u.scores[:, 1:], before.scores[:, 1:], rtol=0, atol=0)
    V = layer.bank.V.data.view(3, 6, 1, 12)
    V[0] += 0.5 * torch.randn_like(V[0])  # perturb level 1's keys
    after_v = layer(x)[1]
    assert not torch.allclose(after_v.scores[:, 1], before.scores[:, 1])


@pytest.mark.parametrize("top_k", [1, 2, 5, 6])
def test_topk_leaves_exactly_k_nonzero_scores(top_k):
    layer = make_layer(top_k=top_k)
    layer.mode = RoutingMode.SPARSE
    x = torch.randn(256, 12)
    _, routing = layer(x)
    nonzero = (routing.scores != 0).sum(-1)
    assert torch.all(nonzero == top_k)
    torch.testing.assert_close(routing.scores.sum(-1), torch.ones(256, 4))


def test_ties_still_select_exactly_k():
    """All logits equal: the top-k mask must still keep exactly k experts per level."""
    gram = torch.zeros(15, 15)
    routing = hierarchical_route(torch.zeros(8, 3, 5), gram, 2, sparse=True)
    assert torch.all((routing.scores != 0).sum(-1) == 2)


@pytest.mark.parametrize("ascending", [False, True])
def test_sparse_rows_product_gradients_match_dense_reference(ascending):
    """Both backward paths (sampled CSR dot products for ascending rows, dense otherwise)."""
    torch.manual_seed(1)
    table = torch.randn(20, 7, dtype=torch.double, requires_grad=True)
    rows = torch.stack([torch.randperm(20)[:4] for _ in range(9)])
    if ascending:
        rows = rows.sort(dim=1).values
    coef = torch.randn(9, 4, dtype=torch.double, requires_grad=True)
    y = sparse_rows_product(coef, rows, table)
    ref = torch.einsum("bj,bjo->bo", coef, table[rows])
    torch.testing.assert_close(y, ref)
    assert torch.autograd.gradcheck(sparse_rows_product, (coef, rows, table))


def test_lora_bank_zero_init_and_shapes():
    bank = LoRAExperts(d_in=16, d_out=8, levels=2, experts=4, rank=3)
    assert bank.down(torch.randn(5, 16)).shape == (5, 2, 4, 3)
    assert bank.keys().shape == (2, 4, 16)
    assert torch.count_nonzero(bank.U) == 0


needs_kernel = pytest.mark.skipif(fused.kernel() is None, reason="fused kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("levels, experts, top_k", [(1, 16, 4), (3, 6, 2), (8, 16, 2)])
def test_fused_kernel_equals_eager_routing_values_and_gradients(sparse, levels, experts, top_k):
    torch.manual_seed(3)
    B, d = 256, 24
    base = torch.randn(B, levels, experts, requires_grad=True)
    keys = torch.randn(levels * experts, d, requires_grad=True)
    weights = torch.randn(B, levels, experts)

    def run(route):
        base.grad, keys.grad = None, None
        gram = keys @ keys.T / d if levels > 1 else None
        r = route(base, gram, top_k, sparse)
        # a loss that reaches the logits, the combination weights and the probabilities
        loss = (r.scores * weights).sum() + r.logits.pow(2).mean() + (r.probs * weights).mean()
        loss.backward()
        grads = (base.grad.clone(), keys.grad.clone() if levels > 1 else None)
        return r, grads

    fast, (gb_fast, gk_fast) = run(hierarchical_route)
    assert isinstance(fast.raw_logits, torch.Tensor)  # the kernel ran
    with fused.eager():
        slow, (gb_slow, gk_slow) = run(hierarchical_route)
    assert isinstance(slow.raw_logits, list)  # the eager path ran
    assert torch.equal(fast.topk.sort(-1).values, slow.topk.sort(-1).values)
    torch.testing.assert_close(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb_fast, gb_slow, rtol=1e-4, atol=1e-5)
    if levels > 1:
        torch.testing.assert_close(gk_fast, gk_slow, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_fused_kernel_inside_the_layer_matches_eager_layer():
    layer = make_layer(levels=4, experts=8, top_k=2)
    x = torch.randn(128, 12)
    y_fast, _ = layer(x)
    with fused.eager():
        y_slow, _ = layer(x)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)


def test_a_built_kernel_loads_past_a_lock_a_killed_process_left():
    """torch's `load` takes a build lock on every call, even with nothing to build; a process
    killed in that moment leaves the lock, and every later `load` would wait on it forever.
    A kernel already built from the current source is imported without the lock."""
    import subprocess
    import sys

    from hilomoe.model import fused

    assert fused.kernel() is not None  # built (or already cached) by this process
    lock = fused._build_dir("hilomoe_routing") / "lock"
    lock.touch()  # fresh: a live build as far as the stale-lock rule can tell
    try:
        code = "from hilomoe.model import fused; assert fused.kernel() is not None"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # a hang guard
    finally:
        lock.unlink(missing_ok=True)
