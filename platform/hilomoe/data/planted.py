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
from hilomoe.metrics import auc, logloss
from hilomoe.schema import FeatureSchema


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


class PlantedModel:
    """The latent model of a planted problem: parameters drawn once from the seed, then rows
    sampled in chunks of any size (the streaming generator draws 100M rows this way)."""

    def __init__(self, spec: PlantedData):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        F, V, m, b = spec.categorical_fields, spec.vocab_size, spec.latent_dim, spec.branching
        self.depth = min(spec.depth, F)
        p = 1.0 / np.arange(1, V + 1) ** spec.zipf_exponent
        cdf = np.cumsum(p / p.sum())
        # inverse CDF tabulated on 2^16 quantiles: a draw is one integer and one lookup
        # (each id's probability is exact to within 2^-16)
        quantiles = (np.arange(1 << 16) + 0.5) / (1 << 16)
        self.rank_of_quantile = np.minimum(np.searchsorted(cdf, quantiles, side="right"), V - 1)
        self.id_of_rank = np.stack([rng.permutation(V) for _ in range(F)])  # (F, V)
        self.beta = rng.normal(0.0, 0.3, size=(F, V))
        self.latent = rng.normal(0.0, 1.0, size=(F, V, m))
        self.child_of_id = rng.integers(0, b, size=(self.depth, V))  # g_d: id of field d -> child
        self.W = [rng.normal(0.0, spec.segment_strength, size=(b ** (d + 1), F, m))
                  for d in range(self.depth)]
        self.a = [rng.normal(0.0, 0.5, size=(b ** (d + 1), spec.numeric_fields))
                  for d in range(self.depth)]
        # A row's logit depends on its leaf of the tree and its ids only, so when small enough
        # everything is tabulated per leaf: beta_f[id] + sum over the leaf's ancestors of
        # <W[node, f], u_f[id]> in one (F, leaves, V) table, and the numeric slopes summed
        # along the path in (leaves, F_n). A row then costs one gather per field.
        self.leaf_table = self.leaf_slopes = None
        leaves = b ** self.depth
        if leaves * F * V <= 1 << 24:
            path = np.arange(leaves)
            self.leaf_table = np.broadcast_to(self.beta[:, None, :], (F, leaves, V)).copy()
            self.leaf_slopes = np.zeros((leaves, spec.numeric_fields))
            for d in range(self.depth):
                ancestor = path // b ** (self.depth - 1 - d)  # the leaf's node at depth d
                per_node = np.einsum("nfm,fvm->fnv", self.W[d], self.latent) / np.sqrt(F * m)
                self.leaf_table += per_node[:, ancestor, :]
                self.leaf_slopes += self.a[d][ancestor]
        # centre the logits so that about a quarter of the rows click
        probe = self.logits(*self._features(np.random.default_rng(spec.seed + 1), 20_000))
        self.offset = -1.0 - float(np.median(probe))

    def _features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        F, V = self.spec.categorical_fields, self.spec.vocab_size
        ranks = self.rank_of_quantile[rng.integers(0, 1 << 16, (n, F), dtype=np.int32)]
        # Zipf ids, the frequent ones not simply the small ones
        cat = self.id_of_rank.ravel()[ranks + np.arange(F) * V]
        num = rng.standard_normal((n, self.spec.numeric_fields)).astype(np.float32)
        return cat, num

    def logits(self, cat: np.ndarray, num: np.ndarray, tabulated: bool = True) -> np.ndarray:
        """The true click logit of each row (without the centring offset).  cat: (n, F)."""
        F, m, b = self.spec.categorical_fields, self.spec.latent_dim, self.spec.branching
        node = np.zeros(len(cat), dtype=np.int64)
        nodes = []
        for d in range(self.depth):
            node = node * b + self.child_of_id[d, cat[:, d]]  # among the b**(d+1) depth-d nodes
            nodes.append(node)
        fields = np.arange(F)
        if tabulated and self.leaf_table is not None:
            leaf = nodes[-1]
            flat = (fields * self.leaf_table.shape[1] + leaf[:, None]) * self.leaf_table.shape[2]
            logit = self.leaf_table.ravel()[flat + cat].sum(axis=1)
            return logit + np.einsum("nj,nj->n", self.leaf_slopes[leaf], num)
        ux = self.latent[fields, cat]  # (n, F, m)
        logit = self.beta[fields, cat].sum(axis=1)
        for d, node in enumerate(nodes):
            logit += np.einsum("nfm,nfm->n", self.W[d][node], ux) / np.sqrt(F * m)
            logit += np.einsum("nj,nj->n", self.a[d][node], num)
        return logit

    def sample(self, rng: np.random.Generator, n: int) -> Split:
        """n rows with their true click probabilities and Bernoulli labels."""
        cat, num = self._features(rng, n)
        prob = 1.0 / (1.0 + np.exp(-(self.logits(cat, num) + self.offset)))
        label = (rng.random(n) < prob).astype(np.float32)
        return Split(cat.astype(np.int64), num, label, prob)


def generate_planted(spec: PlantedData) -> PlantedProblem:
    """The whole planted problem in memory, split at random by the spec's fractions."""
    rows = PlantedModel(spec).sample(np.random.default_rng([spec.seed, 2]), spec.rows)
    n = spec.rows
    n_valid, n_test = int(n * spec.valid_fraction), int(n * spec.test_fraction)
    bounds = {"train": (n_valid + n_test, n), "valid": (0, n_valid),
              "test": (n_valid, n_valid + n_test)}
    splits = {name: Split(rows.cat[lo:hi], rows.num[lo:hi], rows.label[lo:hi], rows.prob[lo:hi])
              for name, (lo, hi) in bounds.items()}  # rows are i.i.d.: contiguous slices suffice
    return PlantedProblem(planted_schema(spec), splits)


def planted_schema(spec: PlantedData) -> FeatureSchema:
    """The feature schema of a planted problem, without generating it."""
    return FeatureSchema(vocab_sizes=(spec.vocab_size,) * spec.categorical_fields,
                         numeric=spec.numeric_fields)
