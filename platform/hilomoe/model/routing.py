"""Routers: one level of (top-k) softmax routing, and HiLoMoE's score-chained hierarchy.

Notation (paper, arXiv 2510.10432, as specified in issue 3):

    q_1     = P x                                              (P learned, or the identity)
    s_l     = softmax(topk_mask(q_l k_l^T / sqrt(d_in)) / T)    (k_l: (K, d_in), level l's keys)
    q_{l+1} = q_l + s_l k_l                                     (routing chains on SCORES)

Because q_l = q_1 + sum_{m<l} s_m k_m is linear in the earlier scores, the logits of every level
split into a part that depends on x only and a K x K correction per earlier level:

    q_l k_l^T = q_1 k_l^T + sum_{m<l} s_m (k_m k_l^T)

`hierarchical_route` takes the first part for all levels at once (one (B, d) x (d, L*K) matmul,
which for rank-1 experts with P = I is exactly the experts' down-projection, so it is free) and
the Gram matrix of the keys, then runs the recurrence over levels on (B, K) tensors only. The loop
over levels is inherent (level l+1 needs level l's top-k), but no d-dimensional work is in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch
from torch import Tensor

import hilomoe.model.fused as fused


class RoutingMode(str, Enum):
    """How MoE projections route; the stage engine sets it (stage 1 off, 2 dense, 3 sparse)."""

    OFF = "off"  # experts disabled: the layer is exactly its base projection
    DENSE = "dense"  # soft routing: every expert weighted by its full softmax score
    SPARSE = "sparse"  # top-k routing: exactly k non-zero scores per level and sample


@dataclass(eq=False)
class Routing:
    """What one MoE projection decided for a batch (B samples, L levels, K experts, k chosen).

    Built from what the forward pass needs; the rest is derived on first access, so inference
    pays for none of it:

    raw_logits: (B, L, K), or L tensors (B, K): temperature-scaled logits fed to the softmax
    top_k:      k
    gates:      (B, L, k) sparse routing: softmax over the selected logits (None when dense)
    selected:   (B, L, k) sparse routing: the selected experts (None when dense)
    soft:       (B, L, K) dense routing: the full softmax (None when sparse)

    logits (B, L, K)  the stacked logits (router z-loss)
    probs  (B, L, K)  softmax of the unmasked logits (load balance, routing entropy)
    scores (B, L, K)  combination weights s_l, zero outside the top-k when sparse
    topk   (B, L, k)  the k highest-scoring experts per level: the routed path
    """

    raw_logits: Tensor | list[Tensor]
    top_k: int
    gates: Tensor | None = None
    selected: Tensor | None = None
    soft: Tensor | None = None

    @cached_property
    def logits(self) -> Tensor:
        if isinstance(self.raw_logits, Tensor):
            return self.raw_logits
        return torch.stack(self.raw_logits, dim=1)

    @cached_property
    def probs(self) -> Tensor:
        return self.soft if self.soft is not None else self.logits.softmax(dim=-1)

    @cached_property
    def scores(self) -> Tensor:
        if self.soft is not None:
            return self.soft
        return torch.zeros_like(self.logits).scatter(-1, self.selected, self.gates)

    @cached_property
    def topk(self) -> Tensor:
        if self.selected is not None:
            return self.selected
        return self.logits.detach().topk(self.top_k, dim=-1).indices

    @property
    def num_experts(self) -> int:
        first = self.raw_logits if isinstance(self.raw_logits, Tensor) else self.raw_logits[0]
        return first.shape[-1]


def query_scale(x: Tensor, normalize: bool, d: int) -> Tensor:
    """Factor turning q . k into routing logits: 1/sqrt(d), times 1/rms(x) when normalizing.

    x: (B, d) -> (B, 1). Normalizing routes on q_1 = x / rms(x), so logits stay of order one
    whatever the scale of x, which in a CTR backbone drifts by orders of magnitude during
    training (the idea of cosine routers); 1/rms(x) is per sample, so the score recurrence stays
    exact (q_l = q_1 + sum_m s_m k_m is unchanged, only q_1 is rescaled).
    """
    scale = 1.0 / math.sqrt(d)
    if not normalize:
        return x.new_full((x.shape[0], 1), scale)
    # a per-sample constant for autograd: routing should not push on the scale of x
    acc = torch.promote_types(x.dtype, torch.float32)  # norms of bf16 inputs in float32
    norm = torch.linalg.vector_norm(x.detach(), dim=-1, keepdim=True, dtype=acc)
    return (scale * math.sqrt(x.shape[-1]) / norm.clamp_min(1e-12)).to(x.dtype)


def select(logits: Tensor, top_k: int, sparse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One level's decision from temperature-scaled logits (B, K).

    Returns (s, gates, selected): s (B, K) the combination weights; sparse: s =
    softmax(topk_mask(logits)), gates (B, k) its non-zero values at `selected` (B, k), exactly k
    per row; dense: s = softmax(logits), gates and selected None.
    """
    if not sparse:
        return logits.softmax(dim=-1), None, None
    top_val, selected = logits.topk(top_k, dim=-1)
    gates = top_val.softmax(dim=-1)
    return torch.zeros_like(logits).scatter(-1, selected, gates), gates, selected


def collect(level_logits: list[Tensor], decisions: list[tuple], top_k: int, sparse: bool) -> Routing:
    """Stack per-level `select` results into one Routing (levels on dim 1)."""
    if sparse:
        gates = torch.stack([d[1] for d in decisions], dim=1)
        selected = torch.stack([d[2] for d in decisions], dim=1)
        return Routing(level_logits, top_k, gates=gates, selected=selected)
    return Routing(level_logits, top_k, soft=torch.stack([d[0] for d in decisions], dim=1))


def route_level(logits: Tensor, top_k: int, temperature: float, sparse: bool) -> Routing:
    """A single level of routing.  logits: (B, K) raw q k^T / sqrt(d) -> Routing with L = 1."""
    scaled = logits / temperature
    if fused.usable(scaled):
        return _fused_route(scaled.unsqueeze(1), None, top_k, sparse)
    return collect([scaled], [select(scaled, top_k, sparse)], top_k, sparse)


def _fused_route(base_logits: Tensor, gram: Tensor | None, top_k: int, sparse: bool) -> Routing:
    gram = gram if gram is not None else base_logits.new_empty(0)
    logits, soft, gates, selected = fused.FusedRoute.apply(base_logits, gram, top_k, sparse)
    if sparse:
        return Routing(logits, top_k, gates=gates, selected=selected)
    return Routing(logits, top_k, soft=soft)


def hierarchical_route(base_logits: Tensor, gram: Tensor | None, top_k: int,
                       sparse: bool) -> Routing:
    """Score-chained routing over L levels.

    base_logits: (B, L, K) = q_1 k_l^T / (sqrt(d_in) T) for every level l.
    gram:        (L*K, L*K) = k k^T / (sqrt(d_in) T) over all levels' keys (None when L = 1).
    Level l's logits are base_logits[:, l] + sum_{m<l} s_m gram[m-block, l-block], which equals
    q_l k_l^T / (sqrt(d_in) T) with q_{l+1} = q_l + s_l k_l. The temperature is folded into both
    inputs by the caller, so the loop does only the irreducibly sequential work: top-k, a k-wide
    softmax, and one (B, K) x (K, rest) product per level, on per-level (B, K) tensors.
    """
    if fused.usable(base_logits):
        return _fused_route(base_logits, gram, top_k, sparse)
    return hierarchical_route_eager(base_logits, gram, top_k, sparse)


def hierarchical_route_eager(base_logits: Tensor, gram: Tensor | None, top_k: int,
                             sparse: bool) -> Routing:
    """`hierarchical_route` in plain PyTorch ops (any device and dtype)."""
    B, L, K = base_logits.shape
    pending = list(base_logits.unbind(dim=1))  # level l's logits so far, (B, K) each
    decisions = []
    for level in range(L):
        decision = select(pending[level], top_k, sparse)
        decisions.append(decision)
        if level + 1 < L:
            block = gram[level * K : (level + 1) * K, (level + 1) * K :]  # (K, (L-l-1)*K)
            later = (decision[0] @ block).view(B, L - level - 1, K).unbind(dim=1)
            for j, contribution in enumerate(later, start=level + 1):
                pending[j] = pending[j] + contribution
    return collect(pending, decisions, top_k, sparse)


def hierarchical_route_reference(
    q1: Tensor, keys: Tensor, top_k: int, temperature: float, sparse: bool
) -> Routing:
    """The literal recurrence q_{l+1} = q_l + s_l k_l, for tests.  q1: (B, d), keys: (L, K, d)."""
    scale = 1.0 / (math.sqrt(keys.shape[-1]) * temperature)
    q, logits, decisions = q1, [], []
    for k_l in keys:
        logit = q @ k_l.T * scale
        decision = select(logit, top_k, sparse)
        logits.append(logit)
        decisions.append(decision)
        q = q + decision[0] @ k_l
    return collect(logits, decisions, top_k, sparse)
