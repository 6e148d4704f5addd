"""`hilomoe data convert`: public CTR formats -> canonical datasets, in two passes over chunks.

    plan    cut the inputs into chunks (chunks.py: byte ranges aligned to line starts, or Parquet
            row ranges), a function of the input only
    pass 1  per chunk (formats.py, pipeline.summarize): parse with pyarrow.csv, check, count every
            categorical value, sum the numerics, count time keys, report malformed rows; the
            driver merges the chunks' reports in chunk order (vocab.py: bounded by --max-vocab)
    pass 2  per chunk (pipeline.encode): ids by vocabulary lookup or hashing, standardised
            numerics; the driver assigns splits and writes each chunk through DatasetWriter
            (atomic, dataset.json last), in chunk order

Categorical encoding, per field: by frequency-threshold vocabulary (values seen at least
`min_count` times get ids 1.. in order of frequency; id 0 is the one OOV id, also used for missing
values) or by hashing into `hash_buckets` ids (id 0 again for missing). With `max_vocab` N, the N
most frequent values, counted in tables pruned back to 2N entries whenever they pass 4N: heavy
hitters keep exact counts, and every count is low by at most a bound reported in dataset.json
(vocab.py states and proves the guarantee). Numeric fields are standardised with pass-1
statistics, missing values becoming 0 (the mean). Splits: seeded random by the given fractions
(row i gets the i-th draw of `default_rng(seed).random`, whatever the chunks; pipeline.Splitter),
or by time where the format has a time key (earliest rows train).

Identical output. The chunk is the unit of writing (one `DatasetWriter.write` per split per
chunk) and of the numeric sums, so the output depends on the chunking and on nothing else:
threads and Ray tasks compute chunks in any order, the driver consumes them in chunk order. A text
file smaller than the chunk size (32 MiB) is one chunk, as the line-by-line converter this
replaces made one chunk of up to 100,000 lines; the output (dataset.json, shards, content hash)
is byte-identical to that converter's for such inputs and for every Parquet input
(tests/golden/convert/ holds its outputs; tests/test_convert.py compares), but where that
converter accepted a non-finite number or counted a row's problems one by one (golden.py's
CASE_COMMITS). Larger text files give
the same rows in the same splits (numerics up to the rounding of their sums), written in other
chunks (another content hash).

Where it runs. In this process (threads), or with `ray=True` on the Ray cluster: pass-1 and
pass-2 chunks become Ray tasks (ray_convert.py), the driver still merges and writes, so the output
is the same. Ray is also used, unasked, inside a Ray job or with RAY_ADDRESS set (a cluster is
at hand) when the input spans more than one chunk (a one-chunk input gains nothing from it).
The inputs must then be readable at the same paths on every node.

Memory is bounded by the chunks in flight (threads + 1, at most MAX_THREADS threads), the
writer's queue (dataset.MAX_IN_FLIGHT tables) and the count tables: one entry per distinct value without `max_vocab`; with it, fewer than 8 * max_vocab
entries plus one chunk's distinct values per field, whatever the input (vocab.py; the result's
`count_table_peak_entries` reports the most each field held). ~550-620 MB peak for 1M or 2M
Criteo rows with 100k ids per field on 2 cores (`hilomoe bench convert`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilomoe.data.convert.chunks import CHUNK_BYTES, CHUNK_ROWS
from hilomoe.data.convert.blocks import Sizes
from hilomoe.data.convert.formats import make_format
from hilomoe.data.convert.pipeline import Pass1Job, Pass2Job, Splitter, ThreadChunks
from hilomoe.data.convert.text import ConvertError, Problems
from hilomoe.data.convert.vocab import Encoder, FieldCounts, KeyCounts
from hilomoe.memory import peak_rss_mb
from hilomoe.data.dataset import SPLITS, DatasetMeta, DatasetWriter, FieldInfo

__all__ = ["ConvertError", "ConvertOptions", "convert", "in_ray_job"]

# a chunk being parsed holds ~5x its bytes (text, Arrow columns, codes): threads x chunk bytes
# bound the memory, whatever the input size
MAX_THREADS = 4


@dataclass
class ConvertOptions:
    min_count: int = 2
    hash_buckets: int | None = None
    max_vocab: int | None = None  # per field: keep the N most frequent values (None: all)
    split: str = "random"  # random | time
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    strict: bool = False
    criteo_ints: str = "categorical"
    rating_threshold: int = 4  # movielens: label = rating >= threshold
    drop_neutral: bool = False  # movielens: leave out ratings of threshold - 1
    overwrite: bool = False
    ray: bool = False  # run the chunks as Ray tasks (see the module docstring)


def in_ray_job() -> bool:
    """Inside a `ray job submit` entrypoint, or with a cluster address set."""
    return bool(os.environ.get("RAY_ADDRESS")) or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def convert(fmt_name: str, inputs: list[str | Path], out: str | Path,
            options: ConvertOptions = ConvertOptions(), field_spec: str | Path | None = None,
            chunk_rows: int | None = None, chunk_bytes: int | None = None) -> dict:
    """Convert `inputs` to a canonical dataset at `out`. Chunks: text files are cut every
    `chunk_bytes` bytes (default 32 MiB), or, given only `chunk_rows`, every `chunk_rows` times
    the file's mean line length; Parquet files every `chunk_rows` rows (default 100,000)."""
    t0 = time.perf_counter()
    fmt = make_format(fmt_name, Path(field_spec) if field_spec else None, options.criteo_ints,
                      options.rating_threshold, options.drop_neutral)
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise ConvertError(f"{p}: no such input file.")
    if options.split == "time" and not fmt.has_time:
        raise ConvertError(f"--split time: the {fmt_name} format has no time column.")
    if options.hash_buckets is not None and options.hash_buckets < 2:
        raise ConvertError("--hash-buckets must be at least 2 (id 0 is reserved for missing).")
    if options.max_vocab is not None and options.max_vocab < 1:
        raise ConvertError(f"--max-vocab must be at least 1, got {options.max_vocab}.")
    # text: chunk_bytes, else chunk_rows lines' worth (Sizes.text_bytes), else CHUNK_BYTES
    sizes = Sizes(chunk_bytes or (None if chunk_rows else CHUNK_BYTES), chunk_rows or CHUNK_ROWS)
    problems = Problems(strict=options.strict)
    chunks = fmt.plan(paths, sizes)
    for path, side in getattr(fmt, "side_problems", []):  # movielens: users.dat, movies.dat
        problems.add_chunk(side.count, [(f"{path}:{1 + p}", r) for p, r in side.examples])

    use_ray = options.ray or (in_ray_job() and len(chunks) > 1)
    if use_ray:
        from hilomoe.distributed.ray_convert import RayChunks

        runner, cache = RayChunks(), None
    else:
        runner = ThreadChunks(min(os.cpu_count() or 1, MAX_THREADS))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        cache = tempfile.mkdtemp(prefix=f".{Path(out).name}.cache-", dir=Path(out).parent)
    try:
        with DatasetWriter(Path(out), len(fmt.cat_fields), len(fmt.num_fields),
                           overwrite=options.overwrite) as writer:
            t1 = time.perf_counter()
            stats = _pass1(fmt, chunks, runner, cache, problems, options)
            if stats.rows == 0:
                raise ConvertError(f"{', '.join(map(str, paths))}: no valid rows to convert "
                                   f"({problems.count} malformed).")
            t2 = time.perf_counter()
            _pass2(fmt, chunks, runner, cache, stats, writer, options)
            meta = writer.close(_meta(fmt, fmt_name, paths, out, stats, problems, options))
            t3 = time.perf_counter()
    finally:
        runner.close()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    return {**meta.model_dump(mode="json"), "rows_skipped": problems.count,
            "skipped_examples": problems.examples, "seconds": time.perf_counter() - t0,
            "pass1_seconds": t2 - t1, "pass2_seconds": t3 - t2, "chunks": len(chunks),
            "ray": use_ray, "peak_rss_mb": peak_rss_mb(),
            "count_table_peak_entries": dict(zip(fmt.cat_fields, stats.table_peak))}


@dataclass
class Stats:
    """Pass 1's results."""

    rows: int
    chunk_rows: list[int]  # checked rows per chunk
    encoders: list[Encoder]
    count_error: list[int]  # per categorical field: how low a count may be (max_vocab)
    table_peak: list[int]  # per categorical field: the most count-table entries held at once
    mean: np.ndarray
    std: np.ndarray
    bounds: tuple[int, int] | None  # time split: the keys at which valid and test begin


def _pass1(fmt, chunks, runner, cache, problems: Problems, options: ConvertOptions) -> Stats:
    counting = options.hash_buckets is None
    positions = runner.positions(cache) if counting else None
    fields = ([FieldCounts(f, options.max_vocab, positions) for f in range(len(fmt.cat_fields))]
              if counting else [])
    num_sum = np.zeros(len(fmt.num_fields))
    num_sq = np.zeros(len(fmt.num_fields))
    num_n = np.zeros(len(fmt.num_fields))
    times = KeyCounts()
    chunk_rows = []
    next_line: dict[str, int] = {}  # per text file: the line number its next chunk starts at
    job = Pass1Job(fmt, counting, options.split == "time", cache)
    for chunk, s in zip(chunks, runner.pass1(job, chunks)):
        if chunk.kind == "text":  # problems as "file:line", counting the chunks before
            first = chunk.first_line or next_line[chunk.path]
            next_line[chunk.path] = first + s.positions
            located = [(f"{chunk.path}:{first + p}", r) for p, r in s.problems.examples]
        else:
            located = [(f"{chunk.path}:row {chunk.start + p}", r) for p, r in s.problems.examples]
        problems.add_chunk(s.problems.count, located)
        chunk_rows.append(s.rows)
        for counts, report in zip(fields, s.counts or []):
            counts.add(chunk.index, *report)
        num_sum += s.num_sum
        num_sq += s.num_sq
        num_n += s.num_n
        if s.times is not None:
            times.add(*s.times)
    if counting:  # the last merges and the sorts, field by field on all cores (no GIL held)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            encoders = list(pool.map(
                lambda c: Encoder.from_counts(c, options.min_count, options.max_vocab), fields))
    else:
        encoders = [Encoder(None, options.hash_buckets) for _ in fmt.cat_fields]
    mean = num_sum / np.maximum(num_n, 1)
    std = np.sqrt(np.maximum(num_sq / np.maximum(num_n, 1) - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    rows = sum(chunk_rows)
    bounds = _time_bounds(*times.result(), options) if options.split == "time" and rows else None
    return Stats(rows, chunk_rows, encoders, [c.error for c in fields],
                 [c.peak_entries for c in fields], mean, std, bounds)


def _pass2(fmt, chunks, runner, cache, stats: Stats, writer: DatasetWriter,
           options: ConvertOptions) -> None:
    split = Splitter(options.seed, options.valid_fraction, options.test_fraction,
                     np.concatenate([[0], np.cumsum(stats.chunk_rows)[:-1]]).tolist(),
                     stats.bounds)
    job = Pass2Job(fmt, stats.encoders, stats.mean, stats.std, cache, split)
    for enc in runner.pass2(job, chunks):
        for name, (cat, num, label) in zip(SPLITS, enc.splits):
            writer.write(name, cat, num, label)


def _meta(fmt, fmt_name: str, paths: list[Path], out, stats: Stats, problems: Problems,
          options: ConvertOptions) -> DatasetMeta:
    oov = "hash" if options.hash_buckets else f"id 0 (count < {options.min_count})"
    fields = [FieldInfo(name=f, type="categorical", vocab_size=e.vocab_size, oov=oov,
                        transform=fmt.transforms.get(f))
              for f, e in zip(fmt.cat_fields, stats.encoders)]
    fields += [FieldInfo(name=f, type="numeric", transform=fmt.transforms.get(f, "standardised"))
               for f in fmt.num_fields]
    extra = {"inputs": [str(p) for p in paths], "split": options.split,
             "rows_skipped": problems.count, "skipped_examples": problems.examples}
    if options.max_vocab is not None and options.hash_buckets is None:
        extra["max_vocab"] = options.max_vocab
        extra["vocab_count_error"] = dict(zip(fmt.cat_fields, stats.count_error))
    return DatasetMeta(name=Path(out).name, source_format=fmt_name, fields=fields, splits={},
                       seed=options.seed, extra=extra)


def _time_bounds(keys: np.ndarray, counts: np.ndarray,
                 options: ConvertOptions) -> tuple[int, int]:
    """Time keys at which valid and test begin: the last fractions of rows by time.
    keys: (k,) int64 sorted, counts: (k,) int64 rows per key."""
    cum = np.cumsum(counts) / counts.sum()
    train_end = 1.0 - options.valid_fraction - options.test_fraction
    valid_start = keys[min(np.searchsorted(cum, train_end, side="left") + 1, len(keys) - 1)]
    test_start = keys[min(np.searchsorted(cum, 1.0 - options.test_fraction, side="left") + 1,
                          len(keys) - 1)]
    return int(valid_start), int(test_start)
