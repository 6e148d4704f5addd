"""Evaluation of a model: routing statistics of MoE layers, and a split's predictions with
their metrics (exact AUC and logloss: `hilomoe.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hilomoe.metrics import auc, logloss
from hilomoe.model.routing import Routing

__all__ = ["Predictions", "RoutingStats"]


class RoutingStats:
    """Accumulates routing decisions over batches, per MoE layer and level.

    Reported per level (averaged over MoE layers):
      utilisation  fraction of the level's experts selected at least once
      load_max     the busiest expert's share of selections times K (1.0 = perfectly balanced)
      entropy      mean entropy of the routing softmax, in nats (log K = uniform)
    and `paths`: distinct routed paths (the tuple of every level's top-k set) per batch, averaged
    over batches and layers; at most min(B, prod over levels of C(K, k)).
    """

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}  # layer -> (L, K) selections
        self.entropy: dict[int, torch.Tensor] = {}  # layer -> (L,) sums
        self.samples = 0
        self.paths: list[float] = []

    @torch.no_grad()
    def add(self, routings: list[Routing]) -> None:
        if not routings:
            return
        self.samples += routings[0].topk.shape[0]
        batch_paths = []
        for i, r in enumerate(routings):
            B, L, K = r.probs.shape
            ones = torch.ones_like(r.topk, dtype=torch.float64).flatten(0, 1)
            counts = torch.zeros(B * L, K, dtype=torch.float64, device=r.topk.device)
            counts.scatter_add_(1, r.topk.flatten(0, 1), ones)
            counts = counts.view(B, L, K).sum(0).cpu()
            self.counts[i] = self.counts[i] + counts if i in self.counts else counts
            p = r.probs.double()
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1).sum(0).cpu()  # (L,)
            self.entropy[i] = self.entropy[i] + ent if i in self.entropy else ent
            path = r.topk.sort(dim=-1).values.flatten(1)  # (B, L*k)
            batch_paths.append(torch.unique(path, dim=0).shape[0])
        self.paths.append(float(np.mean(batch_paths)))

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Fold in another worker's statistics (sums add; per-batch path counts concatenate)."""
        for i, c in other.counts.items():
            self.counts[i] = self.counts[i] + c if i in self.counts else c.clone()
        for i, e in other.entropy.items():
            self.entropy[i] = self.entropy[i] + e if i in self.entropy else e.clone()
        self.samples += other.samples
        self.paths += other.paths
        return self

    def summary(self) -> dict[str, float]:
        if not self.counts:
            return {}
        out: dict[str, float] = {}
        levels = max(c.shape[0] for c in self.counts.values())
        for level in range(levels):
            util, load, ent = [], [], []
            for i, c in self.counts.items():
                if level >= c.shape[0]:
                    continue
                row = c[level]
                util.append(float((row > 0).double().mean()))
                load.append(float(row.max() / row.sum() * row.numel()))
                ent.append(float(self.entropy[i][level] / self.samples))
            out[f"level{level + 1}_utilisation"] = float(np.mean(util))
            out[f"level{level + 1}_load_max"] = float(np.mean(load))
            out[f"level{level + 1}_entropy"] = float(np.mean(ent))
        out["paths"] = float(np.mean(self.paths))
        return out


@dataclass
class Predictions:
    labels: np.ndarray  # (N,)
    probs: np.ndarray  # (N,)
    routing: RoutingStats

    def metrics(self) -> dict[str, float]:
        return {"auc": auc(self.labels, self.probs), "logloss": logloss(self.labels, self.probs),
                **self.routing.summary()}

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        """Every worker's predictions as one: exact metrics over the whole split."""
        routing = RoutingStats()
        for p in parts:
            routing.merge(p.routing)
        return Predictions(np.concatenate([p.labels for p in parts]),
                           np.concatenate([p.probs for p in parts]), routing)
