"""The training objective: task loss plus weighted auxiliary routing losses.

    balance    Switch Transformer load balance, per level: K * sum_k f_k P_k, with f_k the share
               of top-k selections given to expert k and P_k its mean routing probability
               (1.0 when perfectly balanced); averaged over levels and MoE layers
    z          router z-loss (ST-MoE): mean over samples of logsumexp(logits)^2
    diversity  mean squared cosine similarity between distinct keys of one level
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hilomoe.config import AuxWeights
from hilomoe.model.routing import Routing

AUX_NAMES = ("balance", "z", "diversity")


def task_loss(logit: Tensor, label: Tensor) -> Tensor:
    """Binary cross-entropy on logits.  logit, label: (B,)."""
    return F.binary_cross_entropy_with_logits(logit.float(), label.float())


def balance_loss(r: Routing) -> Tensor:
    B, L, K = r.probs.shape
    k = r.topk.shape[-1]
    picks = torch.zeros(B * L, K, device=r.probs.device, dtype=r.probs.dtype)
    picks.scatter_(1, r.topk.flatten(0, 1), 1.0)
    f = picks.view(B, L, K).mean(0) / k  # (L, K), sums to 1 per level
    P = r.probs.mean(0)  # (L, K)
    return (K * (f * P).sum(-1)).mean()


def z_loss(r: Routing) -> Tensor:
    return torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean()


def diversity_loss(keys: Tensor) -> Tensor:
    """keys: (L, K, d) -> mean over levels and pairs j != k of cos(key_j, key_k)^2."""
    L, K, _ = keys.shape
    if K < 2:
        return keys.new_zeros(())
    unit = F.normalize(keys, dim=-1)
    cos2 = (unit @ unit.transpose(1, 2)).pow(2)  # (L, K, K)
    off = cos2.sum((1, 2)) - cos2.diagonal(dim1=1, dim2=2).sum(-1)
    return (off / (K * (K - 1))).mean()


def objective(logit: Tensor, label: Tensor, routings: list[Routing], keys: list[Tensor],
              weights: AuxWeights) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its parts (task, and each auxiliary loss that has a non-zero weight)."""
    parts = {"task": task_loss(logit, label)}
    total = parts["task"]
    if routings:
        n = len(routings)
        if weights.balance:
            parts["balance"] = sum(balance_loss(r) for r in routings) / n
        if weights.z:
            parts["z"] = sum(z_loss(r) for r in routings) / n
    if keys and weights.diversity:
        parts["diversity"] = sum(diversity_loss(k) for k in keys) / len(keys)
    for name in AUX_NAMES:
        if name in parts:
            total = total + getattr(weights, name) * parts[name]
    return total, parts
