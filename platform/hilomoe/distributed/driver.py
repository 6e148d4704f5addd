"""The driver of `hilomoe train`: Ray connection, dataset, worker plan, TorchTrainer, results.

    run = TrainRun.create(cfg, out_dir="runs/example")          # or TrainRun.load(dir) to resume
    summary = train_ray(run, on_event=print)

One Ray Train run holds all three stages (stage boundaries inside the worker loop): the worker
group starts once, and stage N+1 starts from stage N's best weights inside the same engine. The
run directory holds `run.json` (config, Ray run name, storage), Ray's checkpoints, and at the end
`result.json`, `model.pt` (final weights) and `models/<stage>.pt` (each stage's best weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from hilomoe import jsonio
from hilomoe.config import TrainConfig, parse_config
from hilomoe.data.dataset import META_FILE, check_unchanged, open_dataset
from hilomoe.errors import DatasetError, HilomoeError, hilomoe_cause, out_of_memory
from hilomoe.train.resources import WorkerPlan, plan_workers
from hilomoe.engine.loop import stage_weights
from hilomoe.train.worker import WorkerJob, read_checkpoint, train_loop

RUN_FILE = "run.json"

# Ray's own console output (progress bars, INFO lines, print patching) is replaced by ours.
QUIET_RAY_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
}


def cache_dir() -> Path:
    return Path(os.environ.get("HILOMOE_CACHE", Path.home() / ".cache" / "hilomoe"))


def runs_dir(name: str) -> Path:
    """Where a run or study goes without --out: `runs/<name>` under $HILOMOE_HOME, else under
    the working directory. Inside a `ray job submit` entrypoint that directory belongs to Ray,
    which may replace it while the job runs (a study then dies mid-way), so ask for a place."""
    home = os.environ.get("HILOMOE_HOME")
    if home:
        return Path(home) / "runs" / name
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor
        raise HilomoeError(f"inside a Ray job the working directory belongs to Ray and may be "
                           f"replaced: give --out on a shared volume (for example --out "
                           f"/mnt/shared/runs/{name}), or set HILOMOE_HOME.")
    return Path("runs") / name


def synth_dataset(cfg: TrainConfig) -> Path:
    """The config's planted problem as a canonical dataset, written once per spec (cached)."""
    from hilomoe.data.synth import write_synth

    spec = cfg.data.synth
    key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    path = cache_dir() / "datasets" / f"synth-{key}"
    if not (path / META_FILE).exists():
        # written aside and renamed; a job that finishes second keeps the first one's dataset
        # (which other jobs may already be reading) and drops its own
        write_synth(spec, path, keep_existing=True)
        if not (path / META_FILE).exists():
            raise DatasetError(f"{path}: exists but holds no {META_FILE} (not a dataset "
                               f"hilomoe wrote); remove it and run again.")
    return path


def dataset_path(cfg: TrainConfig) -> Path:
    """The dataset a distributed run streams; checked here, before Ray starts."""
    if cfg.data.path:
        path = Path(cfg.data.path).resolve()
        open_dataset(path, training=True)  # raises DatasetError naming the problem
        return path
    return synth_dataset(cfg)


@dataclass
class TrainRun:
    """A run directory: what to train, and where Ray keeps its checkpoints."""

    out_dir: str
    config: dict  # TrainConfig, JSON form (the resolved configuration)
    dataset: str
    name: str  # the Ray Train run name under `storage`
    storage: str  # directory or URI
    dataset_hash: str = ""  # Dataset.fingerprint() when the run started: resume pins it

    @classmethod
    def create(cls, cfg: TrainConfig, out_dir: str | Path) -> TrainRun:
        out = Path(out_dir).resolve()
        if (out / RUN_FILE).exists():
            raise HilomoeError(f"{out}: already holds a run; continue it with --resume {out_dir} "
                               f"or choose another --out.")
        dataset = dataset_path(cfg)
        out.mkdir(parents=True, exist_ok=True)
        storage = cfg.ray.storage or str(out / "checkpoints")
        run = cls(str(out), cfg.model_dump(mode="json"), str(dataset),
                  f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage,
                  open_dataset(dataset, check_shards=False).fingerprint())
        (out / RUN_FILE).write_text(jsonio.dumps(asdict(run), indent=2))
        return run

    @classmethod
    def load(cls, out_dir: str | Path) -> TrainRun:
        path = Path(out_dir) / RUN_FILE
        if not path.is_file():
            raise HilomoeError(f"{out_dir}: not a run directory (no {RUN_FILE}); --resume takes "
                               f"the --out directory of an earlier `hilomoe train`.")
        run = cls(**json.loads(path.read_text()))
        open_dataset(run.dataset)
        check_unchanged(run.dataset, run.dataset_hash, f"the run in {out_dir}")
        return run

    @property
    def cfg(self) -> TrainConfig:
        return parse_config(self.config, str(Path(self.out_dir) / RUN_FILE))


def connect_ray() -> bool:
    """Join RAY_ADDRESS (or the cluster of a `ray job submit`), else start a local Ray sized to
    the machine. Returns True when this call started Ray (and so should stop it)."""
    address = os.environ.get("RAY_ADDRESS")
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not address:  # read when Ray is first imported: keeps a local Ray on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray Data's tasks, the workers and the controller start more processes than a small
        # machine has cores, which Ray reports as a warning on every run
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "16")
        # a local Ray has no dashboard to show metrics and no preemption to watch for; both
        # poll in the background and take CPU from training on a small machine
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise HilomoeError(
            f"cannot reach a Ray cluster at RAY_ADDRESS={address!r} "
            f"({str(err).splitlines()[0]}); start one with `ray start --head`, fix RAY_ADDRESS, "
            f"or unset it to use a local Ray.") from None
    return True


def _check_reachable(address: str) -> None:
    """A GCS address (host:port) that refuses connections fails here in a moment; Ray itself
    retries for a minute or more before it says so."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit() or not host:
        return  # "auto", ray://..., or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port} ({err.strerror or err})") from None


class _Progress:
    """Drains the workers' progress queue into `on_event` on a background thread."""

    def __init__(self, on_event: Callable[[dict], None] | None):
        from ray.util.queue import Queue

        self.on_event = on_event
        self.queue = Queue(actor_options={"num_cpus": 0}) if on_event else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if on_event:
            self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.on_event(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:
                return

    def close(self) -> None:
        if self.on_event:
            self._stop.set()
            self._thread.join(timeout=10)
            import ray

            ray.kill(self.queue.actor)


def _shard_config(workers: int):
    """Train splits equally (every DDP rank must take the same number of steps); evaluation
    splits keep every row (exact metrics over the whole split). One worker reads in order, so a
    seeded single-worker run is bit-reproducible."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    class ShardConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                parts = ds.streaming_split(world_size, equal=name == "train", locality_hints=hints)
                for i, part in enumerate(parts):
                    out[i][name] = part
            return out

    return ShardConfig(execution_options=ExecutionOptions(preserve_order=workers == 1),
                       enable_shard_locality=False)


def ray_datasets(cfg: TrainConfig, dataset, plan: WorkerPlan) -> dict:
    """The TorchTrainer's Ray Data inputs (none when workers read the files themselves)."""
    if cfg.ray.reader == "parquet":
        return {}
    from hilomoe.data.ray_data import open_ray_split

    return {"datasets": {split: open_ray_split(dataset, split, shuffle_files=split == "train",
                                               seed=cfg.seed)
                         for split in ("train", "valid", "test")},
            "dataset_config": _shard_config(plan.workers)}


def make_trainer(cfg: TrainConfig, job: WorkerJob, dataset, plan: WorkerPlan, name: str,
                 storage: str, callbacks: list | None = None):
    """The TorchTrainer of a run (`hilomoe train`, or a study trial with several workers):
    `plan.workers` workers running `train_loop` on `job`, keeping the best checkpoints,
    restarting after worker failures, reading Ray Data shards unless workers read the files."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=job.as_dict(),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=cfg.ray.gpu,
                                     resources_per_worker=plan.resources()),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.ray.keep_checkpoints, checkpoint_score_attribute="score",
                checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks or [],
            # Ray pins OMP_NUM_THREADS to a worker's whole CPUs (1 for a fractional CPU),
            # which set_num_threads alone does not undo
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(plan.torch_threads)}},
        ),
        **ray_datasets(cfg, dataset, plan),
    )


def _failure_message(err: Exception, run: TrainRun) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or err.__cause__ or err
    if hilomoe_cause(cause) is not None:
        return str(hilomoe_cause(cause))
    if out_of_memory(cause):
        return out_of_memory(cause)
    first = str(cause).strip().splitlines()
    last = first[-1] if first else type(cause).__name__
    return (f"training failed on Ray ({type(cause).__name__}: {last}); the run can continue "
            f"with `hilomoe train --resume {run.out_dir}`.")


def train_ray(run: TrainRun, on_event: Callable[[dict], None] | None = None) -> dict:
    """Run (or continue) `run` on Ray Train; returns the summary also written to result.json."""
    cfg = run.cfg
    dataset = open_dataset(run.dataset, training=True)
    started = connect_ray()  # first: it sets the environment Ray reads on import
    import ray

    progress = None
    try:
        plan = plan_workers(cfg.ray, ray.cluster_resources())
        if on_event:
            on_event({"kind": "start", "plan": plan.as_dict(), "out_dir": run.out_dir,
                      "dataset": run.dataset})
        progress = _Progress(on_event)
        job = WorkerJob(config=run.config, dataset=run.dataset, plan=plan.as_dict(),
                        run_dir=run.out_dir, progress=progress.queue)
        trainer = make_trainer(cfg, job, dataset, plan, name=run.name, storage=run.storage)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise HilomoeError(_failure_message(err, run)) from None
        return _collect(run, result, plan)
    finally:
        if progress is not None:
            progress.close()
        if started:
            ray.shutdown()


def _collect(run: TrainRun, result, plan: WorkerPlan) -> dict:
    """Copy the final checkpoint's summary and weights into the run directory."""
    import torch

    out = Path(run.out_dir)
    if result.checkpoint is None:
        raise HilomoeError(f"{run.out_dir}: the Ray run ended without a checkpoint.")
    state, summary = read_checkpoint(result.checkpoint)
    torch.save(state["model"], out / "model.pt")
    (out / "models").mkdir(exist_ok=True)
    for stage, weights in stage_weights(state["stage_models"]).items():
        torch.save(weights, out / "models" / f"{stage}.pt")
    summary.update(out_dir=run.out_dir, workers=plan.workers, plan=plan.as_dict(),
                   checkpoint=result.checkpoint.path, storage=run.storage, run_name=run.name)
    tmp = out / ".result.json.tmp"  # written aside, renamed: never a half-written result
    tmp.write_text(jsonio.dumps(summary, indent=2, default=str))
    tmp.replace(out / "result.json")
    return summary

