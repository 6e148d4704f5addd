"""The batch the engine consumes, and an in-memory source of shuffled batches.

A batch is three tensors: `cat` (B, F_c) int64 ids, `num` (B, F_n) float32, `label` (B,) float32.
Readers (in-memory here; Parquet and Ray Data in later layers) all yield `Batch`.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Batch(NamedTuple):
    cat: Tensor  # (B, F_c) int64
    num: Tensor  # (B, F_n) float32
    label: Tensor  # (B,) float32

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.label.shape[0]


class TensorBatches:
    """Batches of an in-memory split; `epoch(e)` reshuffles with a seed derived from (seed, e).

    >>> source = TensorBatches(cat, num, label, batch_size=512, shuffle=True, seed=0)
    >>> for batch in source.epoch(0): ...
    """

    def __init__(self, cat: np.ndarray | Tensor, num: np.ndarray | Tensor,
                 label: np.ndarray | Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0):
        self.cat = torch.as_tensor(cat, dtype=torch.long)
        self.num = torch.as_tensor(num, dtype=torch.float32)
        self.label = torch.as_tensor(label, dtype=torch.float32)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return self.label.shape[0]

    def epoch(self, epoch: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        """One pass; `batch_size` overrides the source's own (each stage has its own)."""
        size = batch_size or self.batch_size
        cat, num, label = self.cat, self.num, self.label
        if self.shuffle:  # one gather per epoch (parallel), then every batch is a view
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self), generator=g).to(cat.device)
            cat, num, label = cat[order], num[order], label[order]
        for lo in range(0, len(self), size):
            yield Batch(cat[lo : lo + size], num[lo : lo + size], label[lo : lo + size])

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
