"""Dense projections with experts: HiLoMoE and its ablations behind one interface.

Every projection computes  y = W0 x + b + delta(x)  and returns (y, Routing | None):

    DenseProjection             delta = 0                                  (the non-MoE baseline)
    HiLoMoEProjection           delta = sum_l sum_{k in TopK(s_l)} s_l[k] U_l[k] (V_l[k] x),
                                s_l chained on level l-1's scores, all levels batched
    (flat)                      HiLoMoEProjection with 1 level of L*K experts, top L*k
    SequentialLoRAMoEProjection the same experts; level l+1 routes on level l's OUTPUT y_l
    DenseExpertsProjection      classic MoE: K full-rank experts, top-k

`mode` (set by the stage engine) switches the experts off, to soft (dense) or to top-k routing.
With the expert up-factors at zero, every variant in every mode equals its base projection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hilomoe.config import MoEConfig, Variant
from hilomoe.model.experts import FullRankExperts, LoRAExperts
from hilomoe.model.routing import (
    Routing, RoutingMode, collect, hierarchical_route, query_scale, route_level, select,
)


class Projection(nn.Module):
    """y = W0 x + b (+ experts).  x: (B, d_in) -> y: (B, d_out), Routing or None."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.base = nn.Linear(d_in, d_out)
        self.mode = RoutingMode.SPARSE

    has_experts = False

    def forward(self, x: Tensor) -> tuple[Tensor, Routing | None]:
        y = self.base(x)
        if self.mode is RoutingMode.OFF or not self.has_experts:
            return y, None
        delta, routing = self.mixture(x, y, sparse=self.mode is RoutingMode.SPARSE)
        return y + delta, routing

    def mixture(self, x: Tensor, y: Tensor, sparse: bool) -> tuple[Tensor, Routing]:
        """The experts' contribution.  x: (B, d_in), y: (B, d_out) base output -> (B, d_out)."""
        raise NotImplementedError

    def keys(self) -> Tensor:
        """Router keys per level, (L, K, d): what the diversity loss keeps apart."""
        raise NotImplementedError

    def expert_parameters(self) -> list[nn.Parameter]:
        """Everything but the base W0 and b: experts and routers (trained in stage 2)."""
        base = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base]


class DenseProjection(Projection):
    """The plain y = W0 x + b (the non-MoE baseline's projection)."""


class HiLoMoEProjection(Projection):
    """HiLoMoE: L levels x K rank-r LoRA experts with score-chained routing.

    Routing pass: base logits q_1 k_l^T / sqrt(d_in) for all levels in one matmul (with P = I they
    are the experts' down-projections, already needed), then the (B, K) recurrence. Expert pass:
    all L*K down-projections are one matmul, and the L*k selected up-projections one sparse
    product: no loop over levels or experts touches d-dimensional data.
    """

    has_experts = True

    def __init__(self, d_in: int, d_out: int, levels: int, experts: int, rank: int,
                 top_k: int, temperature: float, learned_router: bool, normalize: bool = True):
        super().__init__(d_in, d_out)
        self.levels, self.experts, self.rank = levels, experts, rank
        self.normalize = normalize
        self.top_k, self.temperature = top_k, temperature
        self.bank = LoRAExperts(d_in, d_out, levels, experts, rank)
        # q_1 = P x; P starts at the identity so a learned router begins where P = I does.
        self.router = nn.Linear(d_in, d_in, bias=False) if learned_router else None
        if self.router is not None:
            nn.init.eye_(self.router.weight)

    def keys(self) -> Tensor:
        return self.bank.keys()

    def route(self, x: Tensor, z: Tensor, sparse: bool) -> Routing:
        """x: (B, d_in), z: (B, L, K, r) down-projections -> Routing over (B, L, K)."""
        keys = self.bank.keys().reshape(-1, self.d_in)  # (L*K, d_in)
        # 1 / (sqrt(d) T), and 1 / rms(x) when normalizing: (B, 1, 1)
        scale = (query_scale(x, self.normalize, self.d_in) / self.temperature).unsqueeze(-1)
        if self.router is None:
            base_logits = z[..., 0] * scale  # q_1 = x, and row 0 of V is the key
        else:
            base_logits = (self.router(x) @ keys.T).view(z.shape[:3]) * scale
        gram = None
        if self.levels > 1:
            gram = keys @ keys.T / (math.sqrt(self.d_in) * self.temperature)
        return hierarchical_route(base_logits, gram, self.top_k, sparse)

    def mixture(self, x: Tensor, y: Tensor, sparse: bool) -> tuple[Tensor, Routing]:
        z = self.bank.down(x)  # (B, L, K, r)
        routing = self.route(x, z, sparse)
        return combine(self.bank, z, routing, sparse), routing


def combine(bank: LoRAExperts, z: Tensor, routing: Routing, sparse: bool, first_level: int = 0):
    """sum over experts of s_l[k] U_l[k] z_l[k].  z: (B, L', K, r) -> (B, d_out).

    Sparse: only the (B, L', k) selected experts; dense: every expert, weighted by its score.
    """
    if not sparse:
        return bank.up_dense(routing.scores.unsqueeze(-1) * z, first_level)
    selected = routing.selected
    z_sel = z.gather(2, selected.unsqueeze(-1).expand(*selected.shape, z.shape[-1]))
    return bank.up_sparse(routing.gates.unsqueeze(-1) * z_sel, selected, first_level)


class SequentialLoRAMoEProjection(Projection):
    """Conventional stacking: level 1 routes on x, level l+1 routes on level l's output y_l.

    The experts are HiLoMoE's (same bank, same parameter count) plus one (K, d_out) router per
    level after the first. Level l+1 cannot route before level l's output exists, so depth costs
    sequential latency; the down-projections (which need only x) are still one matmul.
    """

    has_experts = True

    def __init__(self, d_in: int, d_out: int, levels: int, experts: int, rank: int,
                 top_k: int, temperature: float, normalize: bool = True):
        super().__init__(d_in, d_out)
        self.levels, self.experts, self.top_k, self.temperature = levels, experts, top_k, temperature
        self.normalize = normalize
        self.bank = LoRAExperts(d_in, d_out, levels, experts, rank)
        self.routers = nn.Parameter(torch.randn(levels - 1, experts, d_out))

    def keys(self) -> Tensor:
        return self.bank.keys()

    def mixture(self, x: Tensor, y: Tensor, sparse: bool) -> tuple[Tensor, Routing]:
        z = self.bank.down(x)  # (B, L, K, r)
        out, logits, decisions = y, [], []
        for level in range(self.levels):
            if level == 0:
                logit = z[:, 0, :, 0] * query_scale(x, self.normalize, self.d_in)
            else:
                logit = out @ self.routers[level - 1].T * query_scale(out, self.normalize, self.d_out)
            logit = logit / self.temperature
            decision = select(logit, self.top_k, sparse)
            logits.append(logit)
            decisions.append(decision)
            one = collect([logit], [decision], self.top_k, sparse)
            out = out + combine(self.bank, z[:, level : level + 1], one, sparse, level)
        return out - y, collect(logits, decisions, self.top_k, sparse)


class DenseExpertsProjection(Projection):
    """Classic MoE with full-rank experts: delta = sum_{k in TopK} s[k] E_k x (one level)."""

    has_experts = True

    def __init__(self, d_in: int, d_out: int, experts: int, top_k: int, temperature: float,
                 normalize: bool = True):
        super().__init__(d_in, d_out)
        self.top_k, self.temperature, self.normalize = top_k, temperature, normalize
        self.router_keys = nn.Parameter(torch.randn(experts, d_in))
        self.bank = FullRankExperts(d_in, d_out, experts)

    def keys(self) -> Tensor:
        return self.router_keys.unsqueeze(0)

    def mixture(self, x: Tensor, y: Tensor, sparse: bool) -> tuple[Tensor, Routing]:
        logits = x @ self.router_keys.T * query_scale(x, self.normalize, self.d_in)
        routing = route_level(logits, self.top_k, self.temperature, sparse)
        if sparse:
            delta = self.bank.sparse(x, routing.gates[:, 0], routing.selected[:, 0])
        else:
            delta = self.bank.dense(x, routing.soft[:, 0])
        return delta, routing


def make_projection(d_in: int, d_out: int, moe: MoEConfig | None) -> Projection:
    """Build the projection the configuration asks for (None or no experts: dense)."""
    if moe is None or not moe.has_experts:
        return DenseProjection(d_in, d_out)
    L, K, k = moe.levels, moe.experts, moe.top_k
    if moe.variant is Variant.HILOMOE:
        return HiLoMoEProjection(d_in, d_out, L, K, moe.rank, k, moe.temperature,
                                 moe.router_projection == "learned", moe.router_norm)
    if moe.variant is Variant.FLAT:
        return HiLoMoEProjection(d_in, d_out, 1, L * K, moe.rank, L * k, moe.temperature,
                                 moe.router_projection == "learned", moe.router_norm)
    if moe.variant is Variant.SEQUENTIAL:
        return SequentialLoRAMoEProjection(d_in, d_out, L, K, moe.rank, k, moe.temperature,
                                           moe.router_norm)
    if moe.variant is Variant.DENSE_EXPERTS:
        return DenseExpertsProjection(d_in, d_out, K, k, moe.temperature, moe.router_norm)
    raise ValueError(f"unknown variant {moe.variant!r}")
