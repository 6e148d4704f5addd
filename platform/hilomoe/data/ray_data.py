"""A canonical dataset split as a Ray Data dataset, streamed into `Batch`es.

    ds = open_ray_split(dataset, "train", shuffle_files=True)      # lazy read_parquet
    source = RayBatches(ds, dataset, batch_size=4096, shuffle_buffer=65_536, seed=0)
    for batch in source.epoch(e): ...                               # a new execution per epoch

In a Ray Train worker, wrap the worker's shard (`ray.train.get_dataset_shard("train")`) in
`RayBatches` instead; it has the same `epoch` API as the pyarrow reader, so the engine cannot
tell them apart. Batches are built from Arrow by `BatchCollate` (the wide `cat` / `num` columns
viewed as arrays, no per-column numpy round trip); nothing is materialised: blocks stream
through the object store, files in a shuffled order, rows mixed in a local shuffle buffer.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from hilomoe.data.batches import Batch
from hilomoe.data.dataset import Dataset
from hilomoe.data.readers import columns_of, rebatch


def open_ray_split(dataset: Dataset, split: str, shuffle_files: bool = False, seed: int = 0):
    """`ray.data.read_parquet` over the split's shards (file order shuffled when asked)."""
    import ray.data
    from ray.data import FileShuffleConfig

    files = [str(f) for f in dataset.files(split)]
    shuffle = FileShuffleConfig(seed=seed) if shuffle_files else None
    return ray.data.read_parquet(files, shuffle=shuffle, file_extensions=None)


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


class RayBatches:
    """A BatchSource over a Ray Data dataset or a worker's DataIterator shard.

    Whole blocks come out of Ray as Arrow tables (`iter_batches(batch_size=None)`), so Ray's
    per-batch formatting and its own shuffle buffer, which cost an order of magnitude in rows/s
    here, are skipped; the same `rebatch` as the pyarrow reader then shuffles and batches.
    """

    def __init__(self, data, dataset: Dataset, batch_size: int, shuffle_buffer: int | None = None,
                 seed: int = 0, prefetch_batches: int = 2):
        self.data, self.batch_size = data, batch_size
        self.shuffle_buffer, self.seed, self.prefetch = shuffle_buffer, seed, prefetch_batches
        schema = dataset.schema
        self.num_cat, self.num_numeric = len(schema.vocab_sizes), schema.numeric

    def _blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for table in self.data.iter_batches(batch_size=None, batch_format="pyarrow",
                                            prefetch_batches=self.prefetch):
            if table.num_rows:
                yield columns_of(table, self.num_cat, self.num_numeric)

    def epoch(self, epoch: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle_buffer else None
        return rebatch(self._blocks(), batch_size or self.batch_size, rng,
                       self.shuffle_buffer or 0)

    def torch_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """The same batches through Ray's own `iter_torch_batches` (no shuffle buffer)."""
        collate = BatchCollate(self.num_cat, self.num_numeric)
        for batch in self.data.iter_torch_batches(batch_size=batch_size or self.batch_size,
                                                  collate_fn=collate,
                                                  prefetch_batches=self.prefetch):
            yield Batch(*batch)
