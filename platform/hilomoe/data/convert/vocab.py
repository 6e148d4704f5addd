"""Vocabularies: per-field value counts merged chunk by chunk, and value -> id encoders.

Counting. Each chunk reports, per categorical field, the values its rows hold (bytes, distinct)
and their counts.
The driver folds them into one count table per field, in chunk order. Merging is lazy: reports
wait in a pending list until it holds as many entries as the table (at least MERGE_ENTRIES), then
one `dictionary_encode` of [table, pending...] plus a weighted `bincount` merges them; each entry
is thus hashed O(1) times on average, and memory per field is the table plus at most as much
pending. The table only grows (an entry keeps its position), so the merge also tells where each
of a chunk's values sits in the final table: with a `positions_dir`, those positions are written
per chunk and field, and pass 2 encodes the chunk by two gathers (table position -> id, value ->
position) instead of hashing its values again.

Bounded memory (`max_vocab` = N). The vocabulary keeps the N most frequent values, so the table
need not hold every value: when a merge leaves it with more than CAPACITY_FACTOR * N = 4N entries,
the entries counted at most c times are dropped, c being the (2N + 1)-th largest count, so at most
2N remain; c is added to the field's error bound E (reported in dataset.json as
extra.vocab_count_error). Memory: pending reports are merged once they hold as many entries as
the table (at least MERGE_ENTRIES), or 4N if that is fewer, so a merge sees at most 4N table
entries, fewer than 4N pending ones and the last chunk's values: fewer than 8N + (one chunk's
distinct values) entries at any time, however many distinct values the input holds
(`peak_entries`). Guarantees, per field:

  * a count is never too high, and is low by at most E: a dropped value that comes back starts
    again from zero, and each prune takes at most c of its occurrences;
  * a value that is never dropped is counted exactly;
  * heavy hitters are kept exactly: at a prune, the table's counts sum to at most R, the field's
    values counted so far, so at most 2N entries exceed R / (2N + 1), and c <= R / (2N + 1). A
    value holding more than a 1 / (2N + 1) share of the values counted so far at every prune (the
    N-th most frequent value of a stationary stream, when it clears that bar) is never dropped
    and its count is exact;
  * the result is deterministic: prunes happen at the same points of the same chunk order in
    the single process and on Ray.

A pruned table is compacted, so positions no longer hold: from its first prune on, a field is
encoded by looking its values up (as on Ray). Without `max_vocab` (the default) nothing is
dropped: counts are exact, as before.

Encoding. Values seen at least `min_count` times (and not missing) get ids 1.. by decreasing count,
ties by value (byte order, which is code-point order); id 0 is the OOV id, also for missing values.
A chunk's codes are encoded through their positions (above), or by looking up the chunk's
distinct values once (`pyarrow.compute.index_in`, unseen -> 0) and gathering. With `hash_buckets`
B the id of a value is `pd.util.hash_array(value) % (B - 1) + 1` (bit-identical to the old
converter's), 0 for missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from hilomoe.data.convert.columns import Codes, texts

MERGE_ENTRIES = 1 << 16
CAPACITY_FACTOR = 4


def positions_file(directory: str | Path, chunk: int, field: int) -> Path:
    """Where the table positions of a chunk's values of one field are kept (int32, raw)."""
    return Path(directory) / f"{chunk:06d}.{field:03d}.pos"


class FieldCounts:
    """Counts of one field's values (see the module docstring)."""

    def __init__(self, field: int, max_vocab: int | None = None,
                 positions_dir: str | None = None):
        self.field = field
        self.values = pa.array([], pa.binary())
        self.counts = np.zeros(0, dtype=np.int64)
        self.capacity = None if max_vocab is None else CAPACITY_FACTOR * max_vocab
        self.keep = None if max_vocab is None else 2 * max_vocab
        self.error = 0  # the most any count may be low by
        self.peak_entries = 0  # the most entries merged at once (table + pending): the memory
        self.positions_dir = positions_dir  # None once a prune has moved the table's entries
        self._pending: list[tuple] = []  # add()'s arguments
        self._pending_entries = 0

    @property
    def positional(self) -> bool:
        """Whether every chunk's positions were written (no prune happened)."""
        return self.positions_dir is not None

    def add(self, chunk: int, values: pa.Array, counts: np.ndarray, used: np.ndarray | None,
            num_values: int) -> None:
        """Add chunk `chunk`'s distinct values and counts, which are its codes' values at
        `used` (None: all `num_values` of them; the others are held by no row)."""
        self._pending.append((chunk, values, counts, used, num_values))
        self._pending_entries += len(values)
        due = max(len(self.values), MERGE_ENTRIES)
        if self.capacity is not None:
            due = min(due, self.capacity)
        if self._pending_entries >= due:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_entries = self._pending, [], 0
        values = pa.concat_arrays([self.values, *(p[1] for p in pending)])
        self.peak_entries = max(self.peak_entries, len(values))
        weights = np.concatenate([self.counts, *(p[2] for p in pending)])
        # the table comes first, so its entries keep their positions in the new dictionary
        enc = values.dictionary_encode()
        positions = enc.indices.to_numpy()
        # float64 weights are exact for counts below 2^53
        counts = np.bincount(positions, weights=weights,
                             minlength=len(enc.dictionary)).astype(np.int64)
        self.values, self.counts = enc.dictionary, counts
        if self.capacity is not None and len(counts) > self.capacity:
            cut = int(np.partition(counts, len(counts) - self.keep - 1)[-self.keep - 1])
            kept = np.flatnonzero(counts > cut)
            self.values, self.counts = self.values.take(pa.array(kept)), counts[kept]
            self.error += cut
            self.positions_dir = None
        if self.positions_dir is not None:
            offset = len(weights) - sum(len(p[1]) for p in pending)
            for chunk, v, _, used, num_values in pending:
                at = positions[offset:offset + len(v)]
                if used is not None:  # values no row holds: position -1, id 0
                    at, full = np.full(num_values, -1, dtype=np.int32), at
                    at[used] = full
                at.tofile(positions_file(self.positions_dir, chunk, self.field))
                offset += len(v)

    def result(self) -> tuple[pa.Array, np.ndarray]:
        """All values (in table order: position i is values[i]) and their counts."""
        self._merge()
        return self.values, self.counts


class KeyCounts:
    """Exact counts of int64 keys (time keys), merged lazily like FieldCounts' tables."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_entries = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((keys, counts))
        self._pending_entries += len(keys)
        if self._pending_entries >= max(len(self.keys), MERGE_ENTRIES):
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        weights = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self._pending, self._pending_entries = [], 0
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=weights,
                                  minlength=len(self.keys)).astype(np.int64)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted keys, counts)."""
        self._merge()
        return self.keys, self.counts


def vocabulary(values: pa.Array, counts: np.ndarray, min_count: int,
               max_vocab: int | None) -> np.ndarray:
    """Table positions of the vocabulary in id order (id = index + 1): count >= min_count (and
    >= 1), not missing, by decreasing count then value; at most max_vocab of them."""
    table = pa.table({"v": values, "c": counts, "p": np.arange(len(values), dtype=np.int64)})
    keep = pc.and_(pc.greater_equal(table["c"], max(min_count, 1)),
                   pc.not_equal(table["v"], b""))
    table = table.filter(keep).sort_by([("c", "descending"), ("v", "ascending")])
    if max_vocab is not None:
        table = table.slice(0, max_vocab)
    return table["p"].to_numpy()


class Encoder:
    """Value -> id for one categorical field: a vocabulary or hashing.

    vocab        the vocabulary's values in id order (binary), for lookups
    id_of        (table size + 1,) int32: the id of each table position (0: not in the
                 vocabulary), then 0 for position -1 (a value no row holds); set when the
                 field's positions were written
    """

    def __init__(self, vocab: pa.Array | None, hash_buckets: int | None,
                 id_of: np.ndarray | None = None):
        self.vocab, self.hash_buckets, self.id_of = vocab, hash_buckets, id_of
        self.vocab_size = hash_buckets if hash_buckets is not None else len(vocab) + 1

    @classmethod
    def from_counts(cls, counts: FieldCounts, min_count: int,
                    max_vocab: int | None) -> Encoder:
        values, n = counts.result()
        order = vocabulary(values, n, min_count, max_vocab)
        id_of = None
        if counts.positional:
            id_of = np.zeros(len(values) + 1, dtype=np.int32)  # the last: position -1
            id_of[order] = np.arange(1, len(order) + 1, dtype=np.int32)
        return cls(values.take(pa.array(order)), None, id_of)

    def ids_of(self, values: pa.Array) -> np.ndarray:
        """(len(values),) int32 ids of values, which must be distinct (as Codes' are)."""
        if self.hash_buckets is None:
            # the vocabulary looked up in the chunk's values, not the other way round: hashing
            # the chunk's few distinct values beats hashing the vocabulary, ~2.5x here
            ids = np.zeros(len(values), dtype=np.int32)
            pos = pc.index_in(self.vocab, value_set=values)
            found = np.flatnonzero(pos.is_valid().to_numpy(zero_copy_only=False))
            ids[pos.filter(pos.is_valid()).to_numpy()] = found + 1
            return ids
        strings = np.array(texts(values), dtype=object)
        h = pd.util.hash_array(strings, categorize=False)
        ids = (h % np.uint64(self.hash_buckets - 1)).astype(np.int64) + 1
        return np.where(strings == "", 0, ids).astype(np.int32)

    def __call__(self, codes: Codes, positions: np.ndarray | None = None) -> np.ndarray:
        """(n,) int32 ids of a chunk's rows; `positions`: its values' table positions."""
        if positions is not None and self.id_of is not None:
            return self.id_of[positions][codes.indices]
        return self.ids_of(codes.values)[codes.indices]
