"""Vocabularies: per-field value counts merged chunk by chunk, and value -> id encoders.

Counting. Each chunk reports, per categorical field, the values its rows hold (bytes, distinct)
and their counts.
The driver folds them into one count table per field, in chunk order. Merging is lazy: reports
wait in a pending list until it holds as many entries as the table (at least MERGE_ENTRIES), then
one `dictionary_encode` of [table, pending...] plus a weighted `bincount` merges them; each entry
is thus hashed O(1) times on average, and memory per field is the table plus at most as much
pending. The table only grows (an entry keeps its position), so the merge also tells where each
of a chunk's values sits in the final table: given a place for them (`positions`: files in the
single process, Ray's object store on Ray), those positions are kept per chunk and field, and pass
2 encodes the chunk by two gathers (table position -> id, value -> position) instead of hashing
its values again.

Where every value is 8 bytes long or empty (Criteo's ids), the table is kept as int64 keys
(_KeyTable): a merge looks the pending values up by binary search in a sorted copy of the keys,
instead of hashing the whole table's bytes again, at the same points and with the same counts,
prunes and positions' meaning; the first value of another length turns it back into bytes.

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
encoded by looking its values up. Without `max_vocab` (the default) nothing is
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


class PositionFiles:
    """Where FieldCounts keeps the table positions of each chunk's values for pass 2: raw
    int32 files in a directory (the single process's cache). On Ray they go to the object
    store instead (ray_convert.PositionRefs); both have put()."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, chunk: int, field: int) -> Path:
        return self.directory / f"{chunk:06d}.{field:03d}.pos"

    def put(self, chunk: int, field: int, positions: np.ndarray) -> None:
        positions.tofile(self.path(chunk, field))

    def get(self, chunk: int, field: int) -> np.ndarray:
        return np.fromfile(self.path(chunk, field), dtype=np.int32)


class FieldCounts:
    """Counts of one field's values (see the module docstring)."""

    def __init__(self, field: int, max_vocab: int | None = None, positions=None):
        self.field = field
        self.values = pa.array([], pa.binary())
        self.counts = np.zeros(0, dtype=np.int64)
        self.capacity = None if max_vocab is None else CAPACITY_FACTOR * max_vocab
        self.keep = None if max_vocab is None else 2 * max_vocab
        self.error = 0  # the most any count may be low by
        self.peak_entries = 0  # the most entries merged at once (table + pending): the memory
        # where chunks' positions go (PositionFiles, PositionRefs); None once a prune has moved
        # the table's entries
        self.positions = positions
        self._pending: list[tuple] = []  # add()'s arguments
        self._pending_entries = 0
        self._keyed: _KeyTable | None = _KeyTable()  # the table while every value fits a key

    @property
    def positional(self) -> bool:
        """Whether every chunk's positions were written (no prune happened)."""
        return self.positions is not None

    def add(self, chunk: int, values: pa.Array, counts: np.ndarray, used: np.ndarray | None,
            num_values: int) -> None:
        """Add chunk `chunk`'s distinct values and counts, which are its codes' values at
        `used` (None: all `num_values` of them; the others are held by no row)."""
        self._pending.append((chunk, values, counts, used, num_values))
        self._pending_entries += len(values)
        due = max(len(self.counts), MERGE_ENTRIES)  # the table's entries
        if self.capacity is not None:
            due = min(due, self.capacity)
        if self._pending_entries >= due:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_entries = self._pending, [], 0
        if self._keyed is not None:
            keys = [_keys_of(p[1]) for p in pending]
            if all(k is not None for k in keys):
                self._merge_keyed(pending, keys)
                return
            self.values = self._keyed.values()  # back to hashing bytes, positions unchanged
            self._keyed = None
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
            self.positions = None
        if self.positions is not None:
            offset = len(weights) - sum(len(p[1]) for p in pending)
            self._write_positions(pending, [positions[offset + a:offset + b] for a, b in
                                            _spans([len(p[1]) for p in pending])])

    def _merge_keyed(self, pending: list[tuple], keys: list[tuple]) -> None:
        """_merge on int64 keys (see _KeyTable): the same counts, prunes and error bound
        (positions may be numbered in another order, which no id depends on)."""
        table = self._keyed
        self.peak_entries = max(self.peak_entries,
                                len(table.counts) + sum(len(p[1]) for p in pending))
        at = [table.add(k, empty, p[2]) for (k, empty), p in zip(keys, pending)]
        self.counts = table.counts
        if self.capacity is not None and len(self.counts) > self.capacity:
            cut = int(np.partition(self.counts, len(self.counts) - self.keep - 1)[-self.keep - 1])
            table.keep(np.flatnonzero(self.counts > cut))
            self.counts = table.counts
            self.error += cut
            self.positions = None
        if self.positions is not None:
            self._write_positions(pending, at)

    def _write_positions(self, pending: list[tuple], at: list[np.ndarray]) -> None:
        """Each pending chunk's table positions of its values, for pass 2."""
        for (chunk, v, _, used, num_values), pos in zip(pending, at):
            pos = pos.astype(np.int32, copy=False)
            if used is not None:  # values no row holds: position -1, id 0
                pos, full = np.full(num_values, -1, dtype=np.int32), pos
                pos[used] = full
            self.positions.put(chunk, self.field, pos)

    def result(self) -> tuple[pa.Array, np.ndarray]:
        """All values (in table order: position i is values[i]) and their counts."""
        self._merge()
        if self._keyed is not None:
            self.values = self._keyed.values()
        return self.values, self.counts


def _spans(lengths: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum([0, *lengths]).tolist()
    return list(zip(ends[:-1], ends[1:]))


def _keys_of(values: pa.Array) -> tuple[np.ndarray, int] | None:
    """Distinct binary values as (int64 keys of the 8-byte values, in order, index of the
    empty value or -1), or None if some value is neither 8 bytes long nor empty."""
    n = len(values)
    _, offsets, data = values.buffers()[:3]
    if values.null_count or offsets is None:
        return None
    off = np.frombuffer(offsets, dtype=np.int32, count=n + 1, offset=4 * values.offset)
    lengths = np.diff(off)
    empty = np.flatnonzero(lengths == 0)
    if len(empty) > 1 or n - len(empty) != (off[-1] - off[0]) // 8 or \
            np.count_nonzero(lengths == 8) != n - len(empty):
        return None
    raw = np.frombuffer(data, dtype=np.uint8, count=int(off[-1] - off[0]), offset=int(off[0])) \
        if n and data is not None else np.zeros(0, np.uint8)
    keys = raw.view(np.int64) if raw.ctypes.data % 8 == 0 else raw.copy().view(np.int64)
    return keys, int(empty[0]) if len(empty) else -1


def _merged(a: np.ndarray, b: np.ndarray, slots: np.ndarray, old: np.ndarray) -> np.ndarray:
    """a's and b's values in one array: b's at `slots`, a's where `old` is True."""
    out = np.empty(len(a) + len(b), dtype=a.dtype)
    out[slots] = b
    out[old] = a
    return out


class _KeyTable:
    """A count table whose values are 8-byte strings (as int64 keys) and at most one empty
    value: Criteo's ids. Merging looks keys up by binary search in a sorted copy instead of
    hashing the whole table again (~10x faster than `dictionary_encode` of the bytes); a new
    value takes the next position, as in FieldCounts' byte table, so the two agree.

    keys    (n,) int64 the key at each position (0 at the empty value's)
    counts  (n,) int64
    empty   the empty value's position, or -1
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.empty = -1
        self._sorted = np.zeros(0, dtype=np.int64)  # the keys but the empty value's, sorted
        self._order = np.zeros(0, dtype=np.int64)  # their positions

    def add(self, keys: np.ndarray, empty: int, counts: np.ndarray) -> np.ndarray:
        """Add distinct values (keys of the non-empty ones, the empty one's index in the
        values or -1) and their counts; returns each value's position."""
        n = len(keys) + (empty >= 0)
        pos = np.empty(n, dtype=np.int64)
        full = np.ones(n, dtype=bool)
        if empty >= 0:
            full[empty] = False
            if self.empty < 0:
                self.empty = len(self.keys)
                self.keys = np.append(self.keys, 0)
                self.counts = np.append(self.counts, 0)
            pos[empty] = self.empty
        order = np.argsort(keys)  # sorted needles: the binary searches walk the table once
        keys = keys[order]
        at = np.searchsorted(self._sorted, keys)
        found = at < len(self._sorted)
        found[found] = self._sorted[at[found]] == keys[found]
        where = np.empty(len(keys), dtype=np.int64)
        where[found] = self._order[at[found]]
        new = keys[~found]  # sorted
        new_pos = np.arange(len(self.keys), len(self.keys) + len(new))
        where[~found] = new_pos
        pos[np.flatnonzero(full)[order]] = where
        self.keys = np.concatenate([self.keys, new])
        self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
        self.counts[pos] += counts  # positions are distinct: values are
        if len(new):  # merge two sorted runs (np.insert would sort the indices again)
            slots = at[~found] + np.arange(len(new))  # where the new keys land
            old = np.ones(len(self._sorted) + len(new), dtype=bool)
            old[slots] = False
            self._sorted, self._order = _merged(self._sorted, new, slots, old), \
                _merged(self._order, new_pos, slots, old)
        return pos

    def keep(self, kept: np.ndarray) -> None:
        """Only the positions `kept` (ascending) remain, renumbered in order."""
        empty_kept = self.empty >= 0 and bool(np.isin(self.empty, kept))
        self.empty = int(np.searchsorted(kept, self.empty)) if empty_kept else -1
        self.keys, self.counts = self.keys[kept], self.counts[kept]
        full = np.ones(len(kept), dtype=bool)
        if self.empty >= 0:
            full[self.empty] = False
        positions = np.flatnonzero(full)
        order = np.argsort(self.keys[positions], kind="stable")
        self._sorted, self._order = self.keys[positions][order], positions[order]

    def values(self) -> pa.Array:
        """The table's values as binary, in position order."""
        lengths = np.full(len(self.keys), 8, dtype=np.int32)
        if self.empty >= 0:
            lengths[self.empty] = 0
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        data = np.delete(self.keys, self.empty) if self.empty >= 0 else self.keys
        return pa.Array.from_buffers(pa.binary(), len(self.keys),
                                     [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])


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
    keyed = _keys_of(values)
    if keyed is not None:  # 8-byte values: sorted as big-endian integers, ~3x faster
        keys, empty = keyed
        full = np.ones(len(values), dtype=bool)
        if empty >= 0:
            full[empty] = False
        order_key = np.zeros(len(values), dtype=np.uint64)
        order_key[full] = keys.byteswap().view(np.uint64)  # byte order = big-endian order
        pos = np.flatnonzero(full & (counts >= max(min_count, 1)))
        pos = pos[np.lexsort((order_key[pos], -counts[pos]))]
        return pos if max_vocab is None else pos[:max_vocab]
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
