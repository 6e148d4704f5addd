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

import torch
from torch import Tensor


class RoutingMode(str, Enum):
    """How MoE projections route; the stage engine sets it (stage 1 off, 2 dense, 3 sparse)."""

    OFF = "off"  # experts disabled: the layer is exactly its base projection
    DENSE = "dense"  # soft routing: every expert weighted by its full softmax score
    SPARSE = "sparse"  # top-k routing: exactly k non-zero scores per level and sample


@dataclass
class Routing:
    """What one MoE projection decided for a batch (B samples, L levels, K experts, k chosen).

    scores: (B, L, K) combination weights s_l (zero outside the top-k in sparse mode)
    probs:  (B, L, K) softmax of the unmasked logits (load-balance loss, routing entropy)
    logits: (B, L, K) temperature-scaled logits fed to the softmax (router z-loss)
    topk:   (B, L, k) indices of the k highest-scoring experts (the routed path)
    """

    scores: Tensor
    probs: Tensor
    logits: Tensor
    topk: Tensor

    @property
    def num_experts(self) -> int:
        return self.scores.shape[-1]


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
    rms = x.detach().float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    return (scale / rms).to(x.dtype)


def route_level(logits: Tensor, top_k: int, temperature: float, sparse: bool):
    """One level of routing.

    logits: (B, K) raw logits q k^T / sqrt(d). Returns (scores, probs, scaled_logits, topk), the
    first three (B, K) and topk (B, k). Sparse scores are softmax(topk_mask(logits) / T): the
    softmax over the k selected logits scattered into zeros, so exactly k entries are non-zero.
    """
    scaled = logits / temperature
    probs = scaled.softmax(dim=-1)
    top_val, top_idx = scaled.topk(top_k, dim=-1)
    if sparse:
        scores = torch.zeros_like(scaled).scatter(-1, top_idx, top_val.softmax(dim=-1))
    else:
        scores = probs
    return scores, probs, scaled, top_idx


def stack_levels(levels: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Routing:
    """Stack per-level route_level outputs into one Routing with a level axis at dim 1."""
    scores, probs, logits, topk = (torch.stack(parts, dim=1) for parts in zip(*levels))
    return Routing(scores=scores, probs=probs, logits=logits, topk=topk)


def hierarchical_route(
    base_logits: Tensor,
    gram: Tensor | None,
    top_k: int,
    temperature: float,
    sparse: bool,
) -> Routing:
    """Score-chained routing over L levels.

    base_logits: (B, L, K) = q_1 k_l^T / sqrt(d_in) for every level l.
    gram:        (L*K, L*K) = k k^T / sqrt(d_in) over all levels' keys (None when L = 1).
    Level l's logits are base_logits[:, l] + sum_{m<l} s_m gram[m-block, l-block], which equals
    q_l k_l^T / sqrt(d_in) with q_{l+1} = q_l + s_l k_l.
    """
    B, L, K = base_logits.shape
    levels = []
    pending = base_logits  # (B, L - l, K): logits of levels l.. given the scores chosen so far
    for level in range(L):
        route = route_level(pending[:, 0], top_k, temperature, sparse)
        levels.append(route)
        if level + 1 < L:
            block = gram[level * K : (level + 1) * K, (level + 1) * K :]  # (K, (L-l-1)*K)
            pending = pending[:, 1:] + (route[0] @ block).view(B, L - level - 1, K)
    return stack_levels(levels)


def hierarchical_route_reference(
    q1: Tensor, keys: Tensor, top_k: int, temperature: float, sparse: bool
) -> Routing:
    """The literal recurrence q_{l+1} = q_l + s_l k_l, for tests.  q1: (B, d), keys: (L, K, d)."""
    scale = 1.0 / math.sqrt(keys.shape[-1])
    q, levels = q1, []
    for k_l in keys:
        route = route_level(q @ k_l.T * scale, top_k, temperature, sparse)
        levels.append(route)
        q = q + route[0] @ k_l
    return stack_levels(levels)
