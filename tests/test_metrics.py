"""Metrics and auxiliary losses on hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hilomoe.engine.losses import balance_loss, diversity_loss, z_loss
from hilomoe.engine.metrics import RoutingStats
from hilomoe.metrics import auc, average_ranks, logloss
from hilomoe.model.routing import Routing


def pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_hand_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([0, 1, 1, 0], [0.2, 0.9, 0.9, 0.9]) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_equals_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) + 0.3 * y, 1)  # heavy ties
    assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("distinct", [1, 3, 50, 10**9])
def test_average_ranks_equal_scipys_rankdata(distinct):
    """The written-out ranks (metrics.py avoids importing scipy.stats) equal scipy's, with
    ties from none to all."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(distinct)
    for n in (1, 2, 7, 1000):
        s = rng.integers(0, distinct, n).astype(np.float64)
        assert np.array_equal(average_ranks(s), rankdata(s, method="average"))


def test_auc_of_a_nan_score_is_nan():
    assert math.isnan(auc([0, 1, 1], [0.2, float("nan"), 0.4]))


def test_logloss_hand_value():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not infinite


def routing_from(probs: torch.Tensor, topk: torch.Tensor) -> Routing:
    k = topk.shape[-1]
    return Routing(list(probs.log().unbind(1)), k, gates=torch.full(topk.shape, 1.0 / k),
                   selected=topk)


def test_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    B, K = 8, 4
    probs = torch.full((B, 1, K), 1.0 / K)
    balanced = torch.arange(B).remainder(K).view(B, 1, 1)
    assert balance_loss(routing_from(probs, balanced)).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(B, 1, K)
    collapsed_probs[..., 0] = 1.0
    collapsed = torch.zeros(B, 1, 1, dtype=torch.long)
    assert balance_loss(routing_from(collapsed_probs, collapsed)).item() == pytest.approx(K)


def test_z_loss_hand_value():
    r = Routing([torch.zeros(2, 4)], 1, gates=torch.ones(2, 1, 1),
                selected=torch.zeros(2, 1, 1, dtype=torch.long))
    assert z_loss(r).item() == pytest.approx(math.log(4) ** 2)


def test_diversity_loss_orthogonal_is_zero_identical_is_one():
    eye = torch.eye(4).unsqueeze(0)
    assert diversity_loss(eye).item() == pytest.approx(0.0)
    same = torch.ones(1, 3, 5)
    assert diversity_loss(same).item() == pytest.approx(1.0)


def test_routing_stats_counts_paths_and_utilisation():
    topk = torch.tensor([[[0], [1]], [[0], [1]], [[2], [1]]])  # (B=3, L=2, k=1)
    probs = torch.full((3, 2, 4), 0.25)
    stats = RoutingStats()
    stats.add([routing_from(probs, topk)])
    s = stats.summary()
    assert s["paths"] == 2
    assert s["level1_utilisation"] == 0.5 and s["level2_utilisation"] == 0.25
    assert s["level2_load_max"] == pytest.approx(4.0)
    assert s["level1_entropy"] == pytest.approx(math.log(4))
