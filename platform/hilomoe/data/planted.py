"""A planted CTR problem with hierarchical structure, generated in memory.

Rows have Zipf-distributed categorical ids and standard-normal numeric fields. The click
probability comes from a known latent model with a tree of segments:

    segment path   c_d = g_d(id of field d)             d = 1..depth, each in [0, branching)
    logit = b0 + sum_f beta_f[id_f]                      first-order effects
          + sum_d  < W_{c_1..c_d},  u(x) > / sqrt(F m)   each tree node adds its own interactions
          + sum_d  < a_{c_1..c_d},  num >                 and its own numeric slopes

with u(x) the stacked per-id latent vectors u_f[id_f] in R^m of every field. A node deeper in the
tree refines its parent's weights, so the best model is a hierarchy of specialists: the structure
a hierarchical MoE can exploit and a narrow dense network cannot fully represent. Every row's true
probability is kept, so the Bayes-optimal AUC and logloss of each split are known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilomoe.config import PlantedData
from hilomoe.engine.metrics import auc, logloss
from hilomoe.model.ctr import FeatureSchema


@dataclass
class Split:
    cat: np.ndarray  # (N, F_c) int64
    num: np.ndarray  # (N, F_n) float32
    label: np.ndarray  # (N,) float32
    prob: np.ndarray  # (N,) float64, the true click probability

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class PlantedProblem:
    schema: FeatureSchema
    splits: dict[str, Split]  # "train", "valid", "test"

    def bayes(self, split: str) -> dict[str, float]:
        """The ceiling: AUC and logloss of the true probabilities on a split."""
        s = self.splits[split]
        return {"auc": auc(s.label, s.prob), "logloss": logloss(s.label, s.prob)}


def _zipf_ids(rng: np.random.Generator, n: int, vocab: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    ranks = rng.choice(vocab, size=n, p=p / p.sum())
    return rng.permutation(vocab)[ranks]  # frequent ids are not simply the small ones


def generate_planted(spec: PlantedData) -> PlantedProblem:
    rng = np.random.default_rng(spec.seed)
    n, F, V, m, D, b = (spec.rows, spec.categorical_fields, spec.vocab_size, spec.latent_dim,
                        min(spec.depth, spec.categorical_fields), spec.branching)
    cat = np.stack([_zipf_ids(rng, n, V, spec.zipf_exponent) for _ in range(F)], axis=1)
    num = rng.standard_normal((n, spec.numeric_fields)).astype(np.float32)

    beta = rng.normal(0.0, 0.3, size=(F, V))
    latent = rng.normal(0.0, 1.0, size=(F, V, m))
    child_of_id = rng.integers(0, b, size=(D, V))  # g_d: id of field d -> child index

    ux = latent[np.arange(F), cat]  # (n, F, m)
    logit = beta[np.arange(F), cat].sum(axis=1)
    node = np.zeros(n, dtype=np.int64)
    for d in range(D):
        node = node * b + child_of_id[d, cat[:, d]]  # index among the b**(d+1) nodes of depth d+1
        W = rng.normal(0.0, spec.segment_strength, size=(b ** (d + 1), F, m))
        a = rng.normal(0.0, 0.5, size=(b ** (d + 1), spec.numeric_fields))
        logit += np.einsum("nfm,nfm->n", W[node], ux) / np.sqrt(F * m)
        logit += np.einsum("nj,nj->n", a[node], num)
    logit += -1.0 - np.median(logit)  # about a quarter of the rows click
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.float32)

    order = rng.permutation(n)
    n_valid, n_test = int(n * spec.valid_fraction), int(n * spec.test_fraction)
    bounds = {"valid": (0, n_valid), "test": (n_valid, n_valid + n_test),
              "train": (n_valid + n_test, n)}
    splits = {}
    for name, (lo, hi) in bounds.items():
        idx = order[lo:hi]
        splits[name] = Split(cat[idx].astype(np.int64), num[idx], label[idx], prob[idx])
    return PlantedProblem(planted_schema(spec), {k: splits[k] for k in ("train", "valid", "test")})


def planted_schema(spec: PlantedData) -> FeatureSchema:
    """The feature schema of a planted problem, without generating it."""
    return FeatureSchema(vocab_sizes=(spec.vocab_size,) * spec.categorical_fields,
                         numeric=spec.numeric_fields)
