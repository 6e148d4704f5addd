"""Where runs live and how they reach Ray: the cache and runs directories, the dataset a run
streams (a given one, checked, or the config's planted problem, generated once), and the Ray
connection.

    path = dataset_path(cfg)      # before Ray starts: bad input fails fast
    started = connect_ray()       # joins RAY_ADDRESS (or a `ray job submit` cluster), else local

Nothing here imports Ray or torch at module level: `hilomoe study`, `hilomoe data convert --ray`
and `hilomoe train` share these helpers, and only `connect_ray` brings Ray in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hilomoe.config import TrainConfig
from hilomoe.data.dataset import META_FILE, open_dataset
from hilomoe.errors import DatasetError, HilomoeError

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
        raise _unreachable(address, err) from None
    return True


def check_ray_address() -> None:
    """Fail at once when RAY_ADDRESS names a cluster nothing answers at: before the slow work
    that precedes connecting (a study's calibration), not after it."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            _check_reachable(address)
        except ConnectionError as err:
            raise _unreachable(address, err) from None


def _unreachable(address: str | None, err: BaseException) -> HilomoeError:
    return HilomoeError(
        f"cannot reach a Ray cluster at RAY_ADDRESS={address!r} "
        f"({str(err).splitlines()[0]}); start one with `ray start --head`, fix RAY_ADDRESS, "
        f"or unset it to use a local Ray.")


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
