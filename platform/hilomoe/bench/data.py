"""`hilomoe bench data`: rows/s of the data paths, side by side on the same files.

    synth_write     the planted generator streaming a dataset to Parquet (train/valid/test)
    pyarrow_reader  ParquetBatches over the train split into training-ready tensors, an epoch
                    without shuffling and one with the shuffle buffer
    ray_data        RayBatches over the split's row groups as Ray Data read tasks (a local Ray
                    is started unless one is already connected), in order and shuffled
    ray_read_parquet  the same over Ray's own `ray.data.read_parquet` of the same files, in
                    order: the reader `ray_data` replaces (one block per file in Ray 2.60)
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
    path: str  # synth_write / pyarrow_reader / ray_data / ray_read_parquet
    detail: str
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def _time_epochs(path: str, source, shuffled: bool, batch: int) -> list[Row]:
    out = []
    for epoch in range(2):  # the first epoch reads from disk, the second from page cache
        t0 = time.perf_counter()
        n = sum(len(b) for b in source.epoch(epoch))
        out.append(Row(path, f"batch {batch}, {'shuffled' if shuffled else 'in order'}, "
                             f"epoch {epoch + 1}", n, time.perf_counter() - t0))
    return out


def _ray_rows(ds, batch: int) -> list[Row]:
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays local
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # no per-execution INFO lines
    import ray.data

    from hilomoe.distributed.ray_data import RayBatches, open_ray_split

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    try:
        rows = []
        for shuffle in (False, True):
            source = RayBatches(open_ray_split(ds, "train", shuffle_files=shuffle), ds, batch,
                                shuffle_buffer=262_144 if shuffle else None)
            rows += _time_epochs("ray_data", source, shuffle, batch)
        builtin = ray.data.read_parquet([str(f) for f in ds.files("train")])
        return rows + _time_epochs("ray_read_parquet", RayBatches(builtin, ds, batch), False, batch)
    finally:
        if started:
            ray.shutdown()


def run(rows: int = 2_000_000, batch: int = 8192, workdir: str | None = None,
        ray: bool = True) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="hilomoe-bench-data-", dir=workdir))
    try:
        out = tmp / "synth"
        t0 = time.perf_counter()
        write_synth(PlantedData(rows=rows, seed=0), out)
        results = [Row("synth_write", "planted generator -> zstd Parquet", rows,
                       time.perf_counter() - t0)]
        ds = open_dataset(out)
        for shuffle in (False, True):
            results += _time_epochs("pyarrow_reader", ParquetBatches(ds, "train", batch,
                                                                     shuffle=shuffle),
                                    shuffle, batch)
        if ray:
            results += _ray_rows(ds, batch)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def as_json(rows: list[Row]) -> dict:
    return {"rows": [{**asdict(r), "rows_per_s": r.rows_per_s} for r in rows]}
