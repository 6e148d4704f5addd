"""Nested, seeded subsets of a split: the training-set-size axis of a scaling study.

    subset = Subset(fraction=0.25, seed=0)
    cat, num, label = subset.apply((cat, num, label))       # the rows it keeps

A row is kept when a hash of its content (categorical ids and label) and the seed, read as a
uniform number in [0, 1), is below `fraction`. So the subsets are nested (every row of the
25% subset is in the 50% one), the same on every reader, worker count and epoch, and need no
row index: the streaming readers apply it to each chunk before batching. Rows with identical
ids and label are kept or dropped together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Subset:
    fraction: float  # in (0, 1]
    seed: int = 0

    def uniform(self, cat: np.ndarray, label: np.ndarray) -> np.ndarray:
        """cat: (n, F_c), label: (n,) -> (n,) uniforms in [0, 1), one per row."""
        h = np.full(len(label), _mix(np.array([self.seed], np.uint64) * _GOLDEN)[0])
        for column in np.asarray(cat, dtype=np.int64).T.astype(np.uint64):
            h = _mix(h ^ column)
        h = _mix(h ^ np.asarray(label).astype(np.uint64))
        return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    def mask(self, cat: np.ndarray, label: np.ndarray) -> np.ndarray:
        return self.uniform(cat, label) < self.fraction

    def apply(self, chunk: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """(cat, num, label) -> the kept rows of each."""
        keep = self.mask(chunk[0], chunk[2])
        return tuple(a[keep] for a in chunk)


def train_subset(data) -> Subset | None:
    """The train split's subset of a `DataConfig`; None for the whole split."""
    return None if data.train_fraction >= 1.0 else Subset(data.train_fraction, data.subset_seed)
