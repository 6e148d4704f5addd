"""Exact binary-classification metrics, shared by data (the planted problem's Bayes rate), the
engine and reports: numpy and scipy only.

    auc(labels, scores)     # ROC AUC by the rank statistic
    logloss(labels, probs)  # mean binary cross-entropy
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


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
    ranks = rankdata(s, method="average")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
