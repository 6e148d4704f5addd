"""`hilomoe bench train`: samples/s of one model and dataset through every training path.

    memory_ceiling  the in-process engine over tensors already in memory (the ceiling)
    local_parquet   the in-process engine streaming the Parquet dataset with pyarrow
    ray_1, ray_2    Ray Train with 1 and 2 workers, streaming the same files through Ray Data
    ray_1_parquet   the same, each worker reading its own rows of the files with pyarrow

Each path trains the same configuration (two epochs per stage by default) in this one process,
one after the other. `samples_per_s` is train samples over the seconds of the train epochs,
data loading included. `epoch_wall_s` is the median time from one epoch's end to the next's
(train + validation + report + checkpoint); a Ray path's `overhead_fraction` is the share of its
epoch wall time that the in-process Parquet path does not spend. `startup_s` is the time from
the call to the first epoch's start.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hilomoe.config import TrainConfig, load_config
from hilomoe.data.batches import TensorBatches
from hilomoe.data.dataset import SPLITS, Dataset, open_dataset
from hilomoe.data.readers import ParquetBatches
from hilomoe.engine.local import Data, parquet_sources
from hilomoe.session import train_local


@dataclass
class Row:
    mode: str  # memory_ceiling / local_parquet / ray_N (Ray Data) / ray_N_parquet
    samples: int
    train_seconds: float
    epoch_wall_s: float
    startup_s: float
    total_s: float
    overhead_fraction: float | None = None
    gpu: str | None = None
    gpu_peak_fraction: float | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


def bench_config(base: TrainConfig, dataset: Path, epochs: int,
                 batch: int | None = None) -> TrainConfig:
    """The quickstart model on `dataset`, `epochs` epochs per stage, no early stop."""
    over = {"data.path": str(dataset)}
    for stage in ("base", "experts", "joint"):
        over[f"stages.{stage}.epochs"] = epochs
        over[f"stages.{stage}.patience"] = epochs
        if batch:
            over[f"stages.{stage}.batch_size"] = batch
    return base.with_overrides(**over)


def memory_sources(ds: Dataset, cfg: TrainConfig) -> dict[str, TensorBatches]:
    """Every split read fully into tensors (the ceiling's data: no I/O while training)."""
    out = {}
    for split in SPLITS:
        parts = list(ParquetBatches(ds, split, batch_size=1 << 20).epoch(0))
        cat, num, label = (np.concatenate([getattr(b, f).numpy() for b in parts])
                           for f in ("cat", "num", "label"))
        train = split == "train"
        out[split] = TensorBatches(cat, num, label, cfg.stages.base.batch_size if train
                                   else cfg.eval_batch_size, shuffle=train, seed=cfg.seed)
    return out


class _Clock:
    """Timestamps of epoch ends, seen by the caller (in-process callback or Ray progress)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ends: list[float] = []
        self.first_start: float | None = None

    def __call__(self, event) -> None:
        if isinstance(event, dict):
            if event.get("kind") != "epoch":
                return
            seconds = event["epoch_seconds"]
        else:
            seconds = event.seconds
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now - seconds
        self.ends.append(now)

    def row(self, mode: str, summary: dict) -> Row:
        hist = summary["history"]
        walls = np.diff(self.ends)
        return Row(mode, sum(h["samples"] for h in hist), sum(h["seconds"] for h in hist),
                   float(statistics.median(walls)) if len(walls) else float("nan"),
                   (self.first_start or self.t0) - self.t0, time.perf_counter() - self.t0)


# dense bf16 tensor-core peaks (FLOP/s), for the fraction of peak a GPU run reaches
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def gpu_row(cfg: TrainConfig, ds: Dataset, device: str) -> Row:
    """The in-memory ceiling on a GPU (tensors resident on it, bf16 autocast), with the
    fraction of the card's bf16 peak that training FLOPs (3 x forward) reach."""
    import torch

    from hilomoe.model.flops import model_cost

    sources = memory_sources(ds, cfg)
    for src in sources.values():
        src.cat, src.num, src.label = (t.to(device) for t in (src.cat, src.num, src.label))
    clock = _Clock()
    summary = train_local(cfg.with_overrides(**{"runtime.precision": "bf16"}), clock,
                          Data(ds.schema, sources), device=device)
    row = clock.row(f"memory_{device}", summary)
    flops = model_cost(ds.schema, cfg.model, batch=cfg.stages.base.batch_size).flops
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    row.gpu = name
    row.gpu_peak_fraction = 3 * flops * row.samples_per_s / peak if peak else None
    return row


def run(config: str = "studies/train_example.yaml", rows: int = 1_250_000, epochs: int = 2,
        workers: tuple[int, ...] = (1, 2), readers: tuple[str, ...] = ("ray_data", "parquet"),
        workdir: str | None = None, device: str = "cpu", batch: int | None = None) -> list[Row]:
    from hilomoe.config import PlantedData
    from hilomoe.data.synth import write_synth

    base = load_config(config)
    with tempfile.TemporaryDirectory(prefix="hilomoe-bench-train-", dir=workdir) as tmp:
        spec = base.data.synth.model_copy(update={"rows": rows, "valid_fraction": 0.1,
                                                  "test_fraction": 0.1})
        write_synth(PlantedData(**spec.model_dump()), Path(tmp) / "data")
        cfg = bench_config(base, Path(tmp) / "data", epochs, batch)
        ds = open_dataset(cfg.data.path)
        if device != "cpu":  # a GPU: its in-memory ceiling only (Ray Train runs the same loop)
            return [gpu_row(cfg, ds, device)]
        memory = memory_sources(ds, cfg)

        def local(mode: str, sources) -> Row:
            clock = _Clock()
            return clock.row(mode, train_local(cfg, clock, Data(ds.schema, sources)))

        results = [local("memory_ceiling", memory), local("local_parquet", parquet_sources(ds, cfg))]
        import ray

        from hilomoe.distributed.driver import TrainRun, train_ray
        from hilomoe.distributed.runtime import connect_ray

        started = connect_ray()
        try:
            for reader in readers:
                for n in workers:
                    mode = f"ray_{n}" + ("" if reader == "ray_data" else f"_{reader}")
                    run_cfg = cfg.with_overrides(**{"ray.workers": n, "ray.reader": reader})
                    clock = _Clock()
                    summary = train_ray(TrainRun.create(run_cfg, Path(tmp) / mode), clock)
                    results.append(clock.row(mode, summary))
        finally:
            if started:
                ray.shutdown()
        # the VM's speed drifts over minutes: the ceiling is measured first and last, averaged
        again = local("memory_ceiling", memory)
        first = results[0]
        first.samples += again.samples
        first.train_seconds += again.train_seconds
        first.epoch_wall_s = (first.epoch_wall_s + again.epoch_wall_s) / 2
        wall = results[1].epoch_wall_s
        for r in results[2:]:
            r.overhead_fraction = max(0.0, 1 - wall / r.epoch_wall_s)
        return results


def as_json(rows: list[Row]) -> dict:
    return {"rows": [r.as_dict() for r in rows]}
