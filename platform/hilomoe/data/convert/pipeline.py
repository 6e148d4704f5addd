"""The per-chunk work of both passes, and where it runs.

    summarize(job, chunk) -> Summary   pass 1: parse the chunk (formats.py), count its categorical
                                       values, sum its numerics, count its time keys; report its
                                       problems; keep the parsed block in the cache, if any
    summarize_keeping(job, chunk)      the same, returning the block too (Ray: object store)
    encode(job, chunk[, block,         pass 2: the chunk's block (given, from the cache, or
           *positions]) -> Encoded     parsed again) as ids and standardised numerics, divided
                                       into its train, valid and test rows (Splitter)

Both are plain functions of picklable arguments, so the same code runs on a thread pool
(`ThreadChunks`, the single process) and in Ray tasks (ray_convert.py); the driver consumes
their results in chunk order either way, which is what makes the two outputs identical.

The cache (single process only) stores each parsed block as an Arrow IPC file (codes as
dictionary arrays), and the driver stores there the table positions of each chunk's values
(vocab.py), so pass 2 reads ~170 bytes a Criteo row and encodes it by gathers, instead of parsing
the text and hashing its values again: those are the dearest steps, and pass 2 is otherwise bound
by the writer's one thread. On Ray, the object store holds both instead (ray_convert.py): the
nodes need not share a disk.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from hilomoe.data.convert.chunks import Chunk
from hilomoe.data.convert.columns import Codes
from hilomoe.data.convert.blocks import Block
from hilomoe.data.convert.text import ChunkProblems
from hilomoe.data.convert.vocab import Encoder, PositionFiles


@dataclass
class Pass1Job:
    fmt: object  # a format of formats.py
    count_values: bool  # vocabulary mode (hashing needs no counts)
    count_times: bool  # split by time
    cache: str | None  # directory of the block cache, or None


@dataclass
class Summary:
    """What pass 1 needs of a chunk."""

    rows: int
    positions: int  # lines (text) or rows (Parquet) the chunk spans
    problems: ChunkProblems
    counts: list[tuple] | None  # per field: used_counts(codes)
    num_sum: np.ndarray  # (F_n,) float64, missing values add nothing
    num_sq: np.ndarray  # (F_n,)
    num_n: np.ndarray  # (F_n,) values present
    times: tuple[np.ndarray, np.ndarray] | None  # (distinct time keys, counts)


def summarize(job: Pass1Job, chunk: Chunk) -> Summary:
    block = job.fmt.parse(chunk)
    if job.cache is not None:
        write_block(Path(job.cache) / f"{chunk.index:06d}.arrow", block)
    return summary_of(job, block)


def summarize_keeping(job: Pass1Job, chunk: Chunk) -> tuple[Summary, Block]:
    """summarize, and the parsed block itself (its problems left out) for pass 2: on Ray it
    stays in the object store, which moves it to pass 2's node, so pass 2 need not parse the
    text again (nor the nodes share a disk)."""
    block = job.fmt.parse(chunk)
    return summary_of(job, block), Block(block.cat, block.num, block.label, block.time,
                                         block.positions, ChunkProblems())


def summary_of(job: Pass1Job, block: Block) -> Summary:
    counts = [used_counts(c) for c in block.cat] if job.count_values else None
    # the same reductions, on the same (n, F_n) array, as the line-by-line converter's
    present = ~np.isnan(block.num)
    values = np.where(present, block.num, 0.0)
    times = np.unique(block.time, return_counts=True) if job.count_times else None
    return Summary(len(block), block.positions, block.problems, counts, values.sum(0),
                   (values**2).sum(0), present.sum(0), times)


def used_counts(codes: Codes) -> tuple[pa.Array, np.ndarray, np.ndarray | None, int]:
    """(values some row holds, their counts, where they are in codes.values (None: all are),
    len(codes.values)): a value no row holds must not count (nor make a table grow)."""
    counts = codes.counts()
    used = np.flatnonzero(counts)
    if len(used) == len(counts):
        return codes.values, counts, None, len(counts)
    return codes.values.take(pa.array(used)), counts[used], used, len(counts)


@dataclass
class Pass2Job:
    fmt: object
    encoders: list[Encoder]
    mean: np.ndarray  # (F_n,)
    std: np.ndarray  # (F_n,)
    cache: str | None
    split: Splitter


@dataclass
class Splitter:
    """Which split each row goes to: 0 train, 1 valid, 2 test.

    By time: rows at or after `bounds` (valid start, test start) go to valid / test. At random:
    the line-by-line converter drew `rng.random(n)` per chunk from one `default_rng(seed)`, in
    chunk order; PCG64 draws one 64-bit value per double, so a chunk whose rows start at row
    `row_offsets[chunk]` of the conversion gets the same draws from a generator advanced by that
    many steps, wherever and in whatever order the chunks are encoded."""

    seed: int
    valid_fraction: float
    test_fraction: float
    row_offsets: list[int]  # per chunk: checked rows in the chunks before it
    bounds: tuple[int, int] | None = None

    def __call__(self, chunk: Chunk, n: int, time_key: np.ndarray | None) -> np.ndarray:
        if self.bounds is not None:
            valid_start, test_start = self.bounds
            return np.where(time_key >= test_start, 2, np.where(time_key >= valid_start, 1, 0))
        rng = np.random.default_rng(self.seed)
        rng.bit_generator.advance(self.row_offsets[chunk.index])
        u = rng.random(n)
        pv, pt = self.valid_fraction, self.test_fraction
        return np.where(u < pv, 1, np.where(u < pv + pt, 2, 0))


@dataclass
class Encoded:
    """A chunk's rows ready to write: (cat, num, label) per split, train, valid, test.
    cat: (n, F_c) int32 ids; num: (n, F_n) float32 standardised, missing -> 0 (the mean);
    label: (n,) float32."""

    splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def encode(job: Pass2Job, chunk: Chunk, block: Block | None = None,
           *positions: np.ndarray | None) -> Encoded:
    """Pass 2 of a chunk: its `block` as pass 1 kept it, else from the cache, else parsed
    again; its values' table positions per field as given (Ray), else from the cache."""
    if block is not None:
        pass
    elif job.cache is not None:
        block = read_block(Path(job.cache) / f"{chunk.index:06d}.arrow")
    else:
        block = job.fmt.parse(chunk)
    # ids field by field into rows of (F_c, n), each written contiguously; the split's rows
    # are then gathered from its transpose: 2x faster than writing (n, F_c)'s strided columns
    cat_t = np.empty((len(job.encoders), len(block)), dtype=np.int32)
    if not positions and job.cache is not None:  # the single process: from the cache
        files = PositionFiles(job.cache)
        positions = tuple(None if enc.id_of is None else files.get(chunk.index, f)
                          for f, enc in enumerate(job.encoders))
    for f, (enc, codes) in enumerate(zip(job.encoders, block.cat)):
        cat_t[f] = enc(codes, positions[f] if positions else None)
    num = block.num
    if num.shape[1]:
        num = np.nan_to_num((num - job.mean) / job.std)
    num = num.astype(np.float32)
    which = job.split(chunk, len(block), block.time)
    rows = [np.flatnonzero(which == c) for c in range(3)]
    return Encoded([(cat_t.T[r], num[r], block.label[r]) for r in rows])


# ----------------------------------------------------------------------------------------------
# the block cache


def write_block(path: Path, block: Block) -> None:
    cols = {f"c{f}": pa.DictionaryArray.from_arrays(pa.array(c.indices, pa.int32()), c.values)
            for f, c in enumerate(block.cat)}
    cols.update({f"n{j}": pa.array(block.num[:, j]) for j in range(block.num.shape[1])})
    cols["label"] = pa.array(block.label, pa.float32())
    if block.time is not None:
        cols["time"] = pa.array(block.time, pa.int64())
    table = pa.table(cols)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_block(path: Path) -> Block:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    names = table.column_names
    cat = []
    for name in (n for n in names if n.startswith("c")):
        col = table.column(name).combine_chunks()
        cat.append(Codes(col.indices.to_numpy(), col.dictionary))
    n = table.num_rows
    nums = [table.column(x).to_numpy() for x in names if x.startswith("n")]
    num = np.stack(nums, axis=1) if nums else np.zeros((n, 0))
    time = table.column("time").to_numpy() if "time" in names else None
    return Block(cat, num, table.column("label").to_numpy(), time, 0, ChunkProblems())


# ----------------------------------------------------------------------------------------------
# where chunks run


class ThreadChunks:
    """Runs fn(job, chunk) on a thread pool (pyarrow and numpy release the GIL); yields results
    in chunk order with at most `workers + 1` chunks in flight, which bounds memory."""

    ray = False

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def pass1(self, job: Pass1Job, chunks: list[Chunk]) -> Iterator[Summary]:
        return self.map(summarize, job, chunks)

    def pass2(self, job: Pass2Job, chunks: list[Chunk]) -> Iterator[Encoded]:
        return self.map(encode, job, chunks)

    def positions(self, cache: str) -> PositionFiles:
        """Where pass 1 keeps its table positions for pass 2: files in the cache."""
        return PositionFiles(cache)

    def map(self, fn: Callable, job, chunks: Iterable[Chunk]) -> Iterator:
        chunks = list(chunks)
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(fn, job, c) for c in chunks[:self.workers + 1]]
            for i in range(len(chunks)):
                result = futures[i].result()
                futures[i] = None  # the driver holds only what it is consuming
                if i + self.workers + 1 < len(chunks):
                    futures.append(pool.submit(fn, job, chunks[i + self.workers + 1]))
                yield result

    def close(self) -> None:
        pass
