"""Exact binary-classification metrics, shared by data (the planted problem's Bayes rate), the
engine and reports: numpy only.

    auc(labels, scores)     # ROC AUC by the rank statistic
    logloss(labels, probs)  # mean binary cross-entropy
"""

from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
    """Exact ROC AUC by the rank statistic (Mann-Whitney U), tied scores sharing their mean rank.

    AUC = (sum of positive ranks - P (P + 1) / 2) / (P N); NaN when a class is absent.
    """
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if np.isnan(s).any():
        return float("nan")
    pos_rank_sum = float(average_ranks(s)[y].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of `s: (n,)`, each run of tied values sharing its mean rank: what
    `scipy.stats.rankdata(s, method="average")` gives. Written out here because importing
    scipy.stats takes ~1.5 s, paid at the start of every Ray Train worker and Tune trial that
    evaluates a model."""
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each tie run's start
    sizes = np.diff(np.r_[first, s.size])
    mean_rank = first + (sizes + 1) / 2.0  # positions first+1 .. first+size, averaged
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(mean_rank, sizes)
    return ranks


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
