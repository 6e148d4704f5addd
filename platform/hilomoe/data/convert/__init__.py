"""`hilomoe data convert`: public CTR formats -> canonical datasets, in two streaming passes.

    pass 1  count every categorical value (or skip, when hashing), numeric means and variances,
            and the time keys of formats split by time; malformed rows are counted here
    pass 2  encode, split and write shards through DatasetWriter (atomic, dataset.json last)

Categorical encoding, per field: by frequency-threshold vocabulary (values seen at least
`min_count` times get ids 1.. in order of frequency; id 0 is the one OOV id, also used for
missing values) or by hashing into `hash_buckets` ids (id 0 again for missing). Numeric fields are
standardised with pass-1 statistics, missing values becoming 0 (the mean). Splits: seeded random
by the given fractions, or by time where the format has a time key (earliest rows train).
Memory is bounded by the chunk size plus the vocabularies.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hilomoe.data.convert.formats import Parsed, make_format
from hilomoe.data.convert.text import ConvertError, Problems
from hilomoe.data.dataset import SPLITS, DatasetMeta, DatasetWriter, FieldInfo

__all__ = ["ConvertError", "ConvertOptions", "convert"]


@dataclass
class ConvertOptions:
    min_count: int = 2
    hash_buckets: int | None = None
    split: str = "random"  # random | time
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    strict: bool = False
    criteo_ints: str = "categorical"
    rating_threshold: int = 4  # movielens: label = rating >= threshold
    drop_neutral: bool = False  # movielens: leave out ratings of threshold - 1
    overwrite: bool = False


class Encoder:
    """Value -> id for one categorical field."""

    def __init__(self, counts: Counter | None, min_count: int, hash_buckets: int | None):
        self.hash_buckets = hash_buckets
        if hash_buckets is None:
            kept = sorted(((c, v) for v, c in counts.items() if v != "" and c >= min_count),
                          key=lambda cv: (-cv[0], cv[1]))
            self.index = pd.Index([v for _, v in kept], dtype=object)
            self.vocab_size = len(kept) + 1
        else:
            self.vocab_size = hash_buckets

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.hash_buckets is None:
            return self.index.get_indexer(values) + 1  # -1 (unseen or rare) -> 0, the OOV id
        h = pd.util.hash_array(values.astype(object), categorize=True)
        ids = (h % np.uint64(self.hash_buckets - 1)).astype(np.int64) + 1
        return np.where(values == "", 0, ids)


def convert(fmt_name: str, inputs: list[str | Path], out: str | Path,
            options: ConvertOptions = ConvertOptions(), field_spec: str | Path | None = None,
            chunk_rows: int | None = None) -> dict:
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

    # pass 1 ------------------------------------------------------------------------------
    problems = Problems(strict=options.strict)
    counts = [Counter() for _ in fmt.cat_fields]
    num_sum = np.zeros(len(fmt.num_fields))
    num_sq = np.zeros(len(fmt.num_fields))
    num_n = np.zeros(len(fmt.num_fields))
    times: Counter = Counter()
    rows_in = 0
    for parsed in fmt.read(paths, problems):
        rows_in += len(parsed.label)
        if options.hash_buckets is None:
            for c, values in zip(counts, parsed.cat):
                c.update(pd.Series(values).value_counts().to_dict())
        if len(fmt.num_fields):
            present = ~np.isnan(parsed.num)
            values = np.where(present, parsed.num, 0.0)  # missing values add nothing
            num_sum += values.sum(0)
            num_sq += (values**2).sum(0)
            num_n += present.sum(0)
        if options.split == "time":
            times.update(pd.Series(parsed.time).value_counts().to_dict())
    if rows_in == 0:
        raise ConvertError(f"{', '.join(map(str, paths))}: no valid rows to convert "
                           f"({problems.count} malformed).")
    encoders = [Encoder(c, options.min_count, options.hash_buckets) for c in counts]
    mean = num_sum / np.maximum(num_n, 1)
    std = np.sqrt(np.maximum(num_sq / np.maximum(num_n, 1) - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    bounds = _time_bounds(times, options) if options.split == "time" else None

    # pass 2 ------------------------------------------------------------------------------
    rng = np.random.default_rng(options.seed)
    with DatasetWriter(Path(out), len(fmt.cat_fields), len(fmt.num_fields),
                       overwrite=options.overwrite) as writer:
        for parsed in fmt.read(paths, Problems()):  # problems were counted in pass 1
            cat = (np.stack([enc(v) for enc, v in zip(encoders, parsed.cat)], axis=1)
                   if encoders else np.zeros((len(parsed.label), 0), np.int64))
            num = np.nan_to_num((parsed.num - mean) / std) if len(fmt.num_fields) else parsed.num
            which = _assign(parsed, bounds, rng, options)
            for code, split in enumerate(SPLITS):
                mask = which == code
                writer.write(split, cat[mask], num[mask], parsed.label[mask])
        fields = [FieldInfo(name=f, type="categorical", vocab_size=e.vocab_size,
                            oov="hash" if options.hash_buckets else f"id 0 (count < {options.min_count})",
                            transform=fmt.transforms.get(f))
                  for f, e in zip(fmt.cat_fields, encoders)]
        fields += [FieldInfo(name=f, type="numeric", transform=fmt.transforms.get(f, "standardised"))
                   for f in fmt.num_fields]
        meta = DatasetMeta(
            name=Path(out).name, source_format=fmt_name, fields=fields, splits={},
            seed=options.seed,
            extra={"inputs": [str(p) for p in paths], "split": options.split,
                   "rows_skipped": problems.count, "skipped_examples": problems.examples},
        )
        meta = writer.close(meta)
    return {**meta.model_dump(mode="json"), "rows_skipped": problems.count,
            "skipped_examples": problems.examples, "seconds": time.perf_counter() - t0}


def _time_bounds(times: Counter, options: ConvertOptions) -> tuple[int, int]:
    """Time keys at which valid and test begin: the last fractions of rows by time."""
    keys = np.array(sorted(times))
    cum = np.cumsum([times[k] for k in keys]) / sum(times.values())
    train_end = 1.0 - options.valid_fraction - options.test_fraction
    valid_start = keys[min(np.searchsorted(cum, train_end, side="left") + 1, len(keys) - 1)]
    test_start = keys[min(np.searchsorted(cum, 1.0 - options.test_fraction, side="left") + 1,
                          len(keys) - 1)]
    return int(valid_start), int(test_start)


def _assign(parsed: Parsed, bounds, rng: np.random.Generator,
            options: ConvertOptions) -> np.ndarray:
    """Split code per row: 0 train, 1 valid, 2 test."""
    if bounds is not None:
        valid_start, test_start = bounds
        return np.where(parsed.time >= test_start, 2, np.where(parsed.time >= valid_start, 1, 0))
    u = rng.random(len(parsed.label))
    pv, pt = options.valid_fraction, options.test_fraction
    return np.where(u < pv, 1, np.where(u < pv + pt, 2, 0))
