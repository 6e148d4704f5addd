"""A Criteo-shaped planted TSV for benchmarks of `hilomoe data convert`.

    write_criteo_tsv("day_0", rows=2_000_000, ids_per_field=100_000, seed=0)

writes the Kaggle / Terabyte layout (tab-separated, no header, 40 columns):

    label    0/1 (about a quarter clicks)
    I1-I13   integer counts, heavy-tailed (exp of a normal), empty at Criteo-like rates per column;
             I2 reaches down to -3 as Criteo's does
    C1-C26   8-hex-digit ids: field f draws id i in [0, ids_per_field) with probability
             ~ (i + 1)^-1.05 (Zipf), printed as (i * 2654435761 + 40503 * f) mod 2^32 in hex,
             a bijection so the field has exactly ids_per_field possible values; empty at
             Criteo-like rates (44% for C19, C20, C25, C26, 76% for C22)

Columns are built with numpy (ids by inverse-CDF lookup) and written by pyarrow's CSV writer in
blocks of BLOCK_ROWS, so memory is bounded by the block; ~130k rows/s on one core here, so the
2M-row benchmark input takes ~15 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ZIPF_EXPONENT = 1.05
BLOCK_ROWS = 250_000
# share of empty values per column, roughly those of the Kaggle train set
INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0,
               0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44)


def _id_strings(ids_per_field: int, field: int) -> pa.Array:
    """The field's possible values: ids_per_field distinct 8-hex-digit strings."""
    i = np.arange(ids_per_field, dtype=np.uint64)
    codes = (i * np.uint64(2654435761) + np.uint64(40503 * field)) % np.uint64(2**32)
    nibbles = (codes[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(15)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles.astype(np.intp)]  # (n, 8)
    offsets = np.arange(0, 8 * ids_per_field + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(ids_per_field, pa.py_buffer(offsets),
                                       pa.py_buffer(np.ascontiguousarray(chars)))


def _missing(rng: np.random.Generator, n: int, rate: float) -> np.ndarray | None:
    return rng.random(n) < rate if rate > 0 else None


def write_criteo_tsv(path: str | Path, rows: int, ids_per_field: int, seed: int = 0) -> Path:
    """Write `rows` Criteo-shaped rows to `path` (see the module docstring); returns the path."""
    if rows < 1 or ids_per_field < 1:
        raise ValueError(f"rows ({rows}) and ids_per_field ({ids_per_field}) must be positive")
    path = Path(path)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, ids_per_field + 1) ** ZIPF_EXPONENT
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    vocab = [_id_strings(ids_per_field, f) for f in range(26)]
    scale = rng.uniform(0.5, 3.0, 13)  # per-column spread of the integer counts
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    schema = pa.schema([(n, pa.int8() if n == "label" else pa.int64() if n[0] == "I"
                         else pa.string()) for n in names])
    with pacsv.CSVWriter(path, schema, write_options=options) as writer:
        for start in range(0, rows, BLOCK_ROWS):
            n = min(BLOCK_ROWS, rows - start)
            cols: list[pa.Array] = [pa.array((rng.random(n) < 0.25).astype(np.int8))]
            for j in range(13):
                v = np.floor(np.exp(rng.normal(0.0, scale[j], n))).astype(np.int64)
                if j == 1:
                    v -= 3
                cols.append(pa.array(v, mask=_missing(rng, n, INT_MISSING[j])))
            for f in range(26):
                # inverse-CDF draws, looked up in sorted order (cache-friendly) and then put in
                # a random order: still independent draws
                ids = np.searchsorted(cdf, np.sort(rng.random(n)), side="right")
                ids = ids[rng.permutation(n)].astype(np.int32)
                cols.append(vocab[f].take(pa.array(ids, mask=_missing(rng, n, CAT_MISSING[f]))))
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
    return path
