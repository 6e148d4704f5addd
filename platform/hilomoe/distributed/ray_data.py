"""A canonical dataset split as a Ray Data dataset, streamed into `Batch`es.

    ds = open_ray_split(dataset, "train", shuffle_files=True)      # lazy: row-group read tasks
    source = RayBatches(ds, dataset, batch_size=4096, shuffle_buffer=65_536, seed=0)
    for batch in source.epoch(e): ...                               # a new execution per epoch

In a Ray Train worker, wrap the worker's shard (`ray.train.get_dataset_shard("train")`) in
`RayBatches` instead; it has the same `epoch` API as the pyarrow reader, so the engine cannot
tell them apart. Batches are built from Arrow by `BatchCollate` (the wide `cat` / `num` columns
viewed as arrays, no per-column numpy round trip); nothing is materialised: blocks stream
through the object store, row groups in a shuffled order (`ray_source.ParquetRowGroups`),
rows mixed in a local shuffle buffer.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from hilomoe.data.batches import Batch
from hilomoe.data.dataset import Dataset
from hilomoe.distributed.ray_source import open_ray_split
from hilomoe.data.parquet import columns_of
from hilomoe.data.readers import rebatch

__all__ = ["BatchCollate", "RayBatches", "open_ray_split"]


class BatchCollate(ArrowBatchCollateFn):
    """An Arrow batch of the canonical layout -> (cat int64, num float32, label float32)."""

    def __init__(self, num_cat: int, num_numeric: int):
        super().__init__()
        self.num_cat, self.num_numeric = num_cat, num_numeric

    def __call__(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # a plain tuple: Ray rebuilds the collated type positionally when it moves batches to
        # the training device, which a NamedTuple does not survive; RayBatches re-wraps it
        cat, num, label = columns_of(table, self.num_cat, self.num_numeric)
        # Arrow's buffers are read-only; cat is converted (copied) anyway, the rest is small
        return (torch.from_numpy(cat.astype(np.int64)), torch.from_numpy(num.copy()),
                torch.from_numpy(label.copy()))


def row_bytes(dataset: Dataset) -> int:
    """Bytes of one row as the readers hold it: int32 ids, float32 numerics and label."""
    return 4 * (dataset.schema.num_fields + 1)


class RayBatches:
    """A BatchSource over a Ray Data dataset or a worker's DataIterator shard.

    Whole blocks come out of Ray as Arrow tables (`iter_batches(batch_size=None)`), so Ray's
    per-batch formatting and its own shuffle buffer, which cost an order of magnitude in rows/s
    here, are skipped; the same `rebatch` as the pyarrow reader then shuffles and batches.

    With `cache`, the first pass keeps the blocks' columns and later passes replay them without
    Ray: for an evaluation shard read unchanged every epoch. Every consumer of a
    `streaming_split` must start each of its epochs together, so all ranks must make the same
    `cache` choice (decide it from the dataset's metadata, not from what a rank has read).
    """

    def __init__(self, data, dataset: Dataset, batch_size: int, shuffle_buffer: int | None = None,
                 seed: int = 0, prefetch_batches: int = 2, cache: bool = False,
                 subset=None):
        self.data, self.batch_size, self.subset = data, batch_size, subset
        self.shuffle_buffer, self.seed, self.prefetch = shuffle_buffer, seed, prefetch_batches
        schema = dataset.schema
        self.num_cat, self.num_numeric = len(schema.vocab_sizes), schema.numeric
        self.cache = cache
        self._cached: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def _blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._cached is not None:
            yield from self._cached
            return
        kept = []
        for table in self.data.iter_batches(batch_size=None, batch_format="pyarrow",
                                            prefetch_batches=self.prefetch):
            if table.num_rows:
                chunk = columns_of(table, self.num_cat, self.num_numeric)
                if self.cache:  # copied: a view would pin the block in the object store
                    kept.append(tuple(np.array(a) for a in chunk))
                yield chunk
        if self.cache:  # only a complete pass is kept
            self._cached = kept

    def epoch(self, epoch: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle_buffer else None
        return rebatch(self._blocks(), batch_size or self.batch_size, rng,
                       self.shuffle_buffer or 0, self.subset)

    def torch_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """The same batches through Ray's own `iter_torch_batches` (no shuffle buffer)."""
        collate = BatchCollate(self.num_cat, self.num_numeric)
        for batch in self.data.iter_torch_batches(batch_size=batch_size or self.batch_size,
                                                  collate_fn=collate,
                                                  prefetch_batches=self.prefetch):
            yield Batch(*batch)
