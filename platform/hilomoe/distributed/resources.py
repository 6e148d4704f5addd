"""Sizing Ray Train workers so that training and Ray Data can never starve each other.

Ray Data's read tasks need whole CPUs that no training worker holds: on a 2-core machine, two
workers of one CPU each leave none, and the first epoch waits forever (measured). So a plan keeps
`data_cpus` (at least one) free and shares the rest out as fractional worker CPUs; a request that
cannot fit is refused before anything starts, in one sentence that says what would fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hilomoe.config import RayConfig
from hilomoe.errors import HilomoeError


class ResourceError(HilomoeError):
    """A worker request that the Ray cluster cannot hold."""


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: int
    data_cpus: float
    torch_threads: int  # intra-op threads per worker (see plan_workers)

    def resources(self) -> dict[str, float]:
        """`ScalingConfig.resources_per_worker`."""
        out = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            out["GPU"] = float(self.gpus_per_worker)
        return out

    def as_dict(self) -> dict:
        return asdict(self)


MIN_WORKER_CPUS = 0.1  # below this a worker gets too little of a core to be worth its overhead


def plan_workers(settings: RayConfig, cluster: dict[str, float]) -> WorkerPlan:
    """Plan `settings.workers` workers on a cluster with `cluster` resources (`ray.cluster_resources()`)."""
    n = settings.workers
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if settings.gpu and gpus < n:
        raise ResourceError(
            f"--gpu asks for {n} worker(s) with one GPU each, but the Ray cluster has {gpus:g} "
            f"GPU(s); use --workers {int(gpus)} or fewer{' ' if gpus else ', drop --gpu'} or add GPU nodes.")
    data = settings.data_cpus if settings.data_cpus is not None else max(1.0, round(0.1 * cpus))
    spare = cpus - data
    if settings.cpus_per_worker is not None:
        per = settings.cpus_per_worker
        if n * per > spare + 1e-9:
            fit = int(spare / per + 1e-9)
            raise ResourceError(
                f"{n} worker(s) x {per:g} CPU need {n * per:g} CPUs, but the Ray cluster has "
                f"{cpus:g} and {data:g} stay free for Ray Data's read tasks; use at most {fit} "
                f"worker(s), fewer CPUs per worker, or a bigger cluster.")
    else:
        per = math.floor(spare / n * 100) / 100 if n else 0.0
        if per < MIN_WORKER_CPUS:
            fit = int(spare / MIN_WORKER_CPUS + 1e-9) if spare > 0 else 0
            raise ResourceError(
                f"{n} worker(s) do not fit on a Ray cluster of {cpus:g} CPUs while {data:g} stay "
                f"free for Ray Data's read tasks (each worker needs at least {MIN_WORKER_CPUS} "
                f"CPU); use at most {fit} worker(s) or a bigger cluster.")
    # Threads: a worker's own whole CPUs. With `reader: parquet` nothing of Ray Data runs, so
    # the workers also take the data CPUs' share: a core left idle is lost training throughput
    # (measured on 2 cores: one worker with 2 threads against 1). With Ray Data the data CPUs
    # are busy (read tasks, the split coordinator) and a second thread contending with them for
    # a core made one worker 10-20% slower than a single thread (measured).
    own = per + (data / n if settings.reader == "parquet" else 0.0)
    threads = max(1, math.floor(own + 1e-9))
    return WorkerPlan(workers=n, cpus_per_worker=per, gpus_per_worker=1 if settings.gpu else 0,
                      data_cpus=data, torch_threads=threads)
