"""The study caches: trials that share a base model and a dataset share one trained stage 1, and
a configuration trained before is not trained again.

Stage 1 trains the non-MoE base with the experts off, from a seeded base initialisation that
does not depend on the experts (`engine.local.build_model`). Its result is therefore a function
of the dataset, the seed, the base model settings (embeddings, backbone) and the base stage's
recipe, and of how it ran: the code that trains it, torch, the device and the precision. A
study that searches K, L, r, top-k, routing or later-stage settings trains stage 1 once per
distinct base and every other trial adopts the cached weights.
Keys are content hashes of exactly those inputs; entries are written aside, fsynced and renamed,
and a file lock makes concurrent trials with the same key wait for the first instead of
repeating it.

    cache = Stage1Cache(root)
    key = cache.key(cfg, dataset_dir, device)
    with cache.claim(key):                       # one trainer per key at a time
        entry = cache.get(key) or train_and_put(...)

`TrialCache` does the same for whole trials, keyed by the complete configuration.

A cache is an optimisation, never a reason for a trial to fail: a write that fails (a full
disk, a read-only volume) leaves nothing behind and warns once; an entry that cannot be read
(truncated, bad JSON, or holding objects other than tensors: planted) is a miss, warned once
and removed, and nothing in it runs. `hilomoe cache ls | prune` lists and bounds the entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import hilomoe
from hilomoe.atomic import fsync_dir, publish_dir
from hilomoe.config import TrainConfig
from hilomoe.data.dataset import open_dataset
from hilomoe.errors import HilomoeError
from hilomoe.study.space import config_key

if TYPE_CHECKING:
    import torch

    from hilomoe.engine.history import EpochRecord

# torch (and the engine and session, which import it) are imported where entries are keyed,
# read or written: `hilomoe cache ls | prune` and the parsing of their flags need none of
# them, and importing torch takes seconds

WEIGHTS, RECORDS = "base.pt", "entry.json"
T = TypeVar("T")

# what a trained result depends on besides its inputs: the code that trains it (the model, the
# engine and the session that drives it; routing_kernel.cpp is the fused routing's code)
SOURCE_PARTS = ("model", "engine", "session.py", "metrics.py", "schema.py")
SOURCE_SUFFIXES = (".py", ".cpp")


@functools.cache
def source_hash() -> str:
    """A hash of the training code's source files, computed once per process: an edited model
    or engine trains something else, even under the same package version."""
    root = Path(hilomoe.__file__).parent
    h = hashlib.sha256()
    for part in SOURCE_PARTS:
        files = [root / part] if (root / part).is_file() else sorted((root / part).rglob("*"))
        for f in files:
            if f.suffix in SOURCE_SUFFIXES and f.is_file():
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def run_environment(cfg: TrainConfig, device: str | torch.device) -> dict:
    """How a result was computed, beyond its inputs: the package version and the training
    code's source, torch's version, the device type and the precision it trained in (bf16
    autocast where `runtime.precision` asks for it or `auto` finds a GPU that supports it)."""
    import torch

    from hilomoe.session import autocast_dtype

    device = torch.device(device)
    dtype = autocast_dtype(cfg, device)
    return {"hilomoe": hilomoe.__version__, "source": source_hash(),
            "torch": torch.__version__, "device": device.type,
            "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch.")}


# shard path and stat (inode, size, mtime, ctime) -> sha256 of its bytes; ctime cannot be set by
# `cp -p` or `touch`, so a rewritten shard is hashed again
def dataset_fingerprint(path: str | Path) -> str:
    """The dataset's content (`Dataset.fingerprint`): never sizes and modification times, which
    a shard edited and copied with `cp -p` keeps."""
    return open_dataset(path, check_shards=False).fingerprint()


def _hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


_WARNED: set[tuple[str, str]] = set()


def _warn_once(what: str, where: Path, message: str) -> None:
    """One warning per kind of cache trouble and cache directory in a process: a full disk
    would otherwise say the same thing after every trial."""
    if (what, str(where)) not in _WARNED:
        _WARNED.add((what, str(where)))
        warnings.warn(f"hilomoe: {message}", RuntimeWarning, stacklevel=3)


# what reading a damaged entry raises: a truncated zip (torch), bad JSON, a missing field, a
# planted object refused by load_tensors
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
              pickle.UnpicklingError, zipfile.BadZipFile, HilomoeError)


class KeyedStore:
    """Directories by content key under `root`: written aside, fsynced and renamed into place (a
    reader sees a whole entry or none), with one lock per key."""

    kind = "entry"
    marker = RECORDS  # the file every whole entry holds

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def write(self, key: str, files: dict[str, object]) -> bool:
        """`files`: name -> object (`.json` names as JSON, others with torch.save). Returns
        whether the entry is stored (by this call or by another writer of the same key); a
        failure (full disk, read-only cache) removes what it wrote and warns, never raises."""
        from hilomoe.session import write_files

        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
            write_files(files, tmp)
            publish_dir(tmp, self.path(key), keep=True)  # a second writer keeps the first's
            return True
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as either
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _warn_once("write", self.root, f"could not store a {self.kind} cache entry in "
                       f"{self.root} ({_reason(err)}); the result stands, uncached.")
            return False

    def read(self, key: str, load: Callable[[Path], T]) -> T | None:
        """`load(entry directory)`, or None for a missing entry. An unreadable one is a miss
        too: warned about, and removed so that the next result can take its place."""
        d = self.path(key)
        if not (d / self.marker).is_file():
            return None
        try:
            value = load(d)
        except UNREADABLE as err:
            _warn_once("read", self.root, f"{d}: unreadable {self.kind} cache entry "
                       f"({_reason(err)}); treated as a miss and removed.")
            self.discard(key)
            return None
        with contextlib.suppress(OSError):  # last used, for `hilomoe cache prune`
            os.utime(d)
        return value

    def discard(self, key: str) -> None:
        """Remove an entry: first renamed aside (a reader finds it whole or gone), then deleted."""
        try:
            aside = Path(tempfile.mkdtemp(prefix=f".{key}-gone-", dir=self.root))
            os.rename(self.path(key), aside / key)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.root)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the key's lock: a second trial with the same key waits here, then finds the
        first one's entry instead of computing it again. A cache it cannot lock (read-only)
        is used without the lock: a duplicate computation at worst."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path(key), "w")
        except OSError as err:
            _warn_once("lock", self.root, f"could not lock {self.kind} cache entries in "
                       f"{self.root} ({_reason(err)}); trials may repeat each other's work.")
            lock = contextlib.nullcontext()
        with lock as held:
            if held is not None:
                fcntl.flock(held, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class Stage1Entry:
    weights: dict  # the base parameters' state dict (stage 1's best epoch)
    history: list[EpochRecord]  # stage 1's epochs, as the trial that trained it saw them
    seconds: float  # training and validation seconds the entry cost (saved by every reuse)


class Stage1Cache(KeyedStore):
    kind = "stage1"

    @staticmethod
    def key(cfg: TrainConfig, dataset: str | Path, device: str | torch.device) -> str:
        return _hash({
            "dataset": dataset_fingerprint(dataset),
            "seed": cfg.seed,
            "embedding_dim": cfg.model.embedding_dim,
            "embedding": cfg.model.embedding.model_dump(mode="json"),
            "backbone": cfg.model.backbone.model_dump(mode="json"),
            "stage": cfg.stages.base.model_dump(mode="json"),
            "shuffle_buffer": cfg.ray.shuffle_buffer,
            "train_subset": [cfg.data.train_fraction, cfg.data.subset_seed],
            "run": run_environment(cfg, device),
        })

    def get(self, key: str) -> Stage1Entry | None:
        from hilomoe.engine.history import EpochRecord
        from hilomoe.session import load_tensors

        def load(d: Path) -> Stage1Entry:
            meta = json.loads((d / RECORDS).read_text())
            return Stage1Entry(load_tensors(d / WEIGHTS),
                               [EpochRecord(**r) for r in meta["history"]], meta["seconds"])

        return self.read(key, load)

    def put(self, key: str, entry: Stage1Entry) -> bool:
        return self.write(key, {WEIGHTS: entry.weights, RECORDS: {
            "history": [asdict(r) for r in entry.history], "seconds": entry.seconds}})


class TrialCache(KeyedStore):
    """Finished trials by their whole configuration: a sampler that proposes a configuration
    again (TPE does, in small discrete spaces) gets the earlier result instead of a retrain."""

    kind = "trial"
    STATE, SUMMARY = "state.pt", "summary.json"
    marker = SUMMARY

    @staticmethod
    def key(cfg: TrainConfig, dataset: str | Path, device: str | torch.device) -> str:
        return _hash({"dataset": dataset_fingerprint(dataset), "config": config_key(cfg),
                      "run": run_environment(cfg, device)})

    def get(self, key: str) -> tuple[dict, dict] | None:
        from hilomoe.session import load_tensors

        return self.read(key, lambda d: (load_tensors(d / self.STATE),
                                         json.loads((d / self.SUMMARY).read_text())))

    def put(self, key: str, state: dict, summary: dict) -> bool:
        return self.write(key, {self.STATE: state, self.SUMMARY: summary})


# ----------------------------------------------------------------------------------------------
# `hilomoe cache ls | prune`

STORES: dict[str, tuple[str, type[KeyedStore]]] = {"stage1": ("stage1", Stage1Cache),
                                                   "trial": ("trials", TrialCache)}


@dataclass
class CacheEntry:
    kind: str  # stage1 | trial
    key: str
    path: str
    bytes: int
    created: float  # epoch seconds: when the entry was written
    used: float  # epoch seconds: when a trial last read it (or when it was written)


def cache_entries(root: str | Path) -> list[CacheEntry]:
    """Every whole entry under the cache directory `root`, least recently used first."""
    found = []
    for kind, (sub, store) in STORES.items():
        d = Path(root) / sub
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            marker = entry / store.marker
            if entry.name.startswith(".") or not marker.is_file():
                continue  # a write in progress, a lock file
            try:
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                found.append(CacheEntry(kind, entry.name, str(entry), size,
                                        marker.stat().st_mtime, entry.stat().st_mtime))
            except OSError:  # removed meanwhile
                continue
    return sorted(found, key=lambda e: (e.used, e.kind, e.key))


def prune_cache(root: str | Path, older_than_s: float | None = None,
                max_bytes: int | None = None, now: float | None = None) -> list[CacheEntry]:
    """Remove the entries not used for more than `older_than_s` seconds, then the least
    recently used ones until the rest hold at most `max_bytes`. An entry a trial holds the
    lock of right now is left alone. Returns the removed entries."""
    now = time.time() if now is None else now
    entries = cache_entries(root)
    total = sum(e.bytes for e in entries)
    removed = []
    for e in entries:  # least recently used first
        stale = older_than_s is not None and now - e.used > older_than_s
        over = max_bytes is not None and total > max_bytes
        if (stale or over) and _remove_entry(Path(root), e):
            removed.append(e)
            total -= e.bytes
    return removed


def _remove_entry(root: Path, e: CacheEntry) -> bool:
    sub, store_type = STORES[e.kind]
    store = store_type(root / sub)
    try:
        lock = open(store.lock_path(e.key), "a")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a trial is computing or reading it
            return False
        store.discard(e.key)
        with contextlib.suppress(OSError):
            os.unlink(store.lock_path(e.key))
    return not store.path(e.key).exists()


UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
UNITS_B = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([smhdw])")
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?")


def parse_duration(text: str, flag: str = "--older-than") -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise HilomoeError(f"{flag}: {text!r} is not a duration; give a number and a unit "
                           f"(s, m, h, d or w), e.g. 7d or 12h.")
    return float(m[1]) * UNITS_S[m[2]]


def parse_size(text: str, flag: str = "--max-size") -> int:
    """'500M', '10G', '1.5GB', '4096' -> bytes (binary units: K = 1024)."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None:
        raise HilomoeError(f"{flag}: {text!r} is not a size; give a number and an optional "
                           f"unit (K, M, G or T, binary), e.g. 10G or 500M.")
    return int(float(m[1]) * UNITS_B[m[2]])
