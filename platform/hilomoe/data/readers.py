"""Readers that turn a canonical dataset split into `Batch`es for the in-process engine.

`ParquetBatches` streams with pyarrow: one record batch at a time, the wide `cat` / `num`
columns viewed as (n, F) arrays without copying, file order shuffled per epoch and rows mixed in
a bounded local shuffle buffer. Memory is bounded by the buffer, never by the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from hilomoe.data.batches import Batch
from hilomoe.data.checks import RowRules
from hilomoe.data.dataset import Dataset
from hilomoe.data.parquet import Piece, columns_of, parquet_file, shard_pieces, unreadable
from hilomoe.data.subset import Subset


def rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int,
            rng: np.random.Generator | None, buffer_rows: int,
            subset: Subset | None = None) -> Iterator[Batch]:
    """Column chunks (cat, num, label) of any sizes -> Batches of `size` rows.

    With `rng`, rows pass through a shuffle buffer of about `buffer_rows` rows, permuted as a
    whole; without, they keep their order. Only the last batch may be smaller. With `subset`,
    only its rows take part (before batching, so batches keep their size).
    """
    if subset is not None:
        chunks = (subset.apply(chunk) for chunk in chunks)
    buffer: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    limit = buffer_rows if rng is not None else size

    def drain(final: bool) -> Iterator[Batch]:
        nonlocal buffer, buffered
        cat, num, label = (torch.from_numpy(np.concatenate(parts)) for parts in zip(*buffer))
        cat = cat.long()  # once per buffer, not per batch
        if rng is not None:  # torch's gathers are parallel; numpy's fancy indexing is not
            order = torch.from_numpy(rng.permutation(len(label)))
            cat, num, label = cat[order], num[order], label[order]
        keep = len(label) if final else len(label) // size * size
        for lo in range(0, keep, size):
            yield Batch(cat[lo : lo + size], num[lo : lo + size], label[lo : lo + size])
        rest = (cat[keep:].numpy(), num[keep:].numpy(), label[keep:].numpy())
        buffer = [rest] if keep < len(label) else []
        buffered = len(label) - keep

    for chunk in chunks:
        buffer.append(chunk)
        buffered += len(chunk[2])
        if buffered >= limit:
            yield from drain(final=False)
    if buffered:
        yield from drain(final=True)


def _piece_rows(p: Piece) -> Iterator[pa.Table]:
    yield parquet_file(p.path).read_row_group(p.row_group).slice(p.start, p.stop - p.start)


class ParquetBatches:
    """A BatchSource over one split of a canonical dataset (or one rank's shard of it).

    >>> train = ParquetBatches(open_dataset("data/synth"), "train", batch_size=4096, shuffle=True)
    >>> for batch in train.epoch(0): ...

    With `world` > 1 it reads only rank `rank`'s rows (see `shard_pieces`): the reader a
    distributed worker uses when every worker can read the dataset's files directly.
    """

    def __init__(self, dataset: Dataset, split: str, batch_size: int, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 262_144, read_rows: int = 65_536,
                 rank: int = 0, world: int = 1, equal: bool = False,
                 subset: Subset | None = None):
        self.dataset, self.split, self.subset = dataset, split, subset
        self.files = dataset.files(split)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shuffle_buffer, self.read_rows = shuffle_buffer, read_rows
        schema = dataset.schema
        self.num_cat, self.num_numeric = len(schema.vocab_sizes), schema.numeric
        self.rules = RowRules.of(dataset.meta)
        self.sharded = world > 1 or equal
        self.pieces = shard_pieces(self.files, rank, world, equal) if self.sharded else []

    def __len__(self) -> int:
        """Rows read (a subset's: the expected count)."""
        if self.sharded:
            rows = sum(p.stop - p.start for p in self.pieces)
        else:
            rows = self.dataset.meta.splits[self.split].rows
        return rows if self.subset is None else round(rows * self.subset.fraction)

    def _read(self, path: Path, batches) -> Iterator[tuple[np.ndarray, ...]]:
        """Column chunks of `batches` (a lazy iterable), checked; read errors name the file."""
        try:
            for rb in batches:
                chunk = columns_of(rb, self.num_cat, self.num_numeric)
                self.rules.check(path, *chunk)
                yield chunk
        except (pa.ArrowInvalid, OSError) as err:
            raise unreadable(path, err) from None

    def _chunks(self, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, ...]]:
        if self.sharded:
            pieces = list(self.pieces)
            if rng is not None:
                pieces = [pieces[i] for i in rng.permutation(len(pieces))]
            for p in pieces:
                yield from self._read(p.path, _piece_rows(p))
            return
        files = list(self.files)
        if rng is not None:
            files = [files[i] for i in rng.permutation(len(files))]
        for path in files:
            batches = parquet_file(path).iter_batches(batch_size=self.read_rows)
            yield from self._read(path, batches)

    def epoch(self, epoch: int = 0, batch_size: int | None = None) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        return rebatch(self._chunks(rng), batch_size or self.batch_size, rng, self.shuffle_buffer,
                       self.subset)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
