"""`hilomoe bench data`: rows/s of the data paths, side by side on the same files.

    synth_write     the planted generator streaming a dataset to Parquet (train/valid/test)
    pyarrow_reader  ParquetBatches over the train split into training-ready tensors, an epoch
                    without shuffling and one with the shuffle buffer
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hilomoe.config import PlantedData
from hilomoe.data.dataset import open_dataset
from hilomoe.data.readers import ParquetBatches
from hilomoe.data.synth import write_synth


@dataclass
class Row:
    path: str  # synth_write / pyarrow_reader
    detail: str
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def run(rows: int = 2_000_000, batch: int = 8192, workdir: str | None = None) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="hilomoe-bench-data-", dir=workdir))
    try:
        out = tmp / "synth"
        t0 = time.perf_counter()
        write_synth(PlantedData(rows=rows, seed=0), out)
        results = [Row("synth_write", "planted generator -> zstd Parquet", rows,
                       time.perf_counter() - t0)]
        ds = open_dataset(out)
        for shuffle in (False, True):
            source = ParquetBatches(ds, "train", batch, shuffle=shuffle)
            for epoch in range(2):  # the first epoch reads from disk, the second from page cache
                t0 = time.perf_counter()
                n = sum(len(b) for b in source.epoch(epoch))
                results.append(Row("pyarrow_reader",
                                   f"batch {batch}, {'shuffled' if shuffle else 'in order'}, "
                                   f"epoch {epoch + 1}", n, time.perf_counter() - t0))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def as_json(rows: list[Row]) -> dict:
    return {"rows": [{**asdict(r), "rows_per_s": r.rows_per_s} for r in rows]}
