"""`hilomoe data synth`: the planted problem streamed to a canonical dataset, in chunks.

Rows come from `PlantedModel` (planted.py) chunk by chunk and go to train / valid / test at
random by the spec's fractions, so memory is bounded by the chunk size whatever the row count.
Each split's Bayes-optimal AUC and logloss (the ceiling a model can reach) are accumulated on the
way: logloss exactly, AUC from per-class histograms of the true probability over 2^16 bins, ties
within a bin counted as half (the tests bound the error against the exact AUC).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hilomoe.config import PlantedData
from hilomoe.data.dataset import SPLITS, DatasetMeta, DatasetWriter, FieldInfo
from hilomoe.data.planted import PlantedModel

BINS = 1 << 16


class BayesAccumulator:
    """Streaming AUC (histogram) and exact logloss of true probabilities against labels."""

    def __init__(self) -> None:
        self.pos = np.zeros(BINS, dtype=np.int64)
        self.neg = np.zeros(BINS, dtype=np.int64)
        self.loss = 0.0
        self.n = 0

    def add(self, prob: np.ndarray, label: np.ndarray) -> None:
        b = np.minimum((prob * BINS).astype(np.int64), BINS - 1)
        y = label > 0.5
        self.pos += np.bincount(b[y], minlength=BINS)
        self.neg += np.bincount(b[~y], minlength=BINS)
        p = np.clip(prob, 1e-7, 1 - 1e-7)
        self.loss += float(-(np.log(p[y]).sum() + np.log1p(-p[~y]).sum()))
        self.n += len(prob)

    def result(self) -> dict[str, float]:
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if n_pos == 0 or n_neg == 0:
            return {"auc": float("nan"), "logloss": float("nan")}
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in lower bins
        wins = (self.pos * neg_below).sum() + 0.5 * (self.pos * self.neg).sum()
        return {"auc": float(wins / (n_pos * n_neg)), "logloss": self.loss / self.n}


def write_synth(spec: PlantedData, out: str | Path, chunk_rows: int = 262_144,
                overwrite: bool = False, rows_per_file: int = 1_000_000,
                keep_existing: bool = False) -> dict:
    """Generate `spec.rows` planted rows into a canonical dataset at `out`; return its
    dataset.json content plus the generation rate. `keep_existing`: a dataset another writer
    finished at `out` meanwhile stands (the same spec writes the same rows)."""
    t0 = time.perf_counter()
    model = PlantedModel(spec)
    rng = np.random.default_rng([spec.seed, 3])
    bayes = {s: BayesAccumulator() for s in SPLITS}
    p_valid, p_test = spec.valid_fraction, spec.test_fraction
    with DatasetWriter(Path(out), spec.categorical_fields, spec.numeric_fields,
                       rows_per_file=rows_per_file, overwrite=overwrite,
                       keep_existing=keep_existing) as writer:
        done = 0
        while done < spec.rows:
            n = min(chunk_rows, spec.rows - done)
            rows = model.sample(rng, n)
            # rows are i.i.d., so a multinomial count per split and contiguous slices are a
            # uniformly random split, without masks or copies
            counts = rng.multinomial(n, [1.0 - p_valid - p_test, p_valid, p_test])
            lo = 0
            for split, count in zip(SPLITS, counts):
                sl = slice(lo, lo + count)
                writer.write(split, rows.cat[sl], rows.num[sl], rows.label[sl])
                bayes[split].add(rows.prob[sl], rows.label[sl])
                lo += count
            done += n
        fields = [FieldInfo(name=f"C{i + 1}", type="categorical", vocab_size=spec.vocab_size)
                  for i in range(spec.categorical_fields)]
        fields += [FieldInfo(name=f"I{i + 1}", type="numeric", transform="standard normal")
                   for i in range(spec.numeric_fields)]
        meta = DatasetMeta(
            name=Path(out).name, source_format="synth", fields=fields, splits={},
            seed=spec.seed,
            extra={"generator": spec.model_dump(), "bayes": {s: b.result() for s, b in bayes.items()}},
        )
        meta = writer.close(meta)
    seconds = time.perf_counter() - t0
    return {**meta.model_dump(mode="json"), "rows_per_s": spec.rows / seconds, "seconds": seconds}
