"""The study caches: trials that share a base model and a dataset share one trained stage 1, and
a configuration trained before is not trained again.

Stage 1 trains the non-MoE base with the experts off, from a seeded base initialisation that
does not depend on the experts (`engine.local.build_model`). Its result is therefore a function
of the dataset, the seed, the base model settings (embeddings, backbone) and the base stage's
recipe, and nothing else: a study that searches K, L, r, top-k, routing or later-stage
settings trains stage 1 once per distinct base and every other trial adopts the cached weights.
Keys are content hashes of exactly those inputs; entries are written aside and renamed, and a
file lock makes concurrent trials with the same key wait for the first instead of repeating it.

    cache = Stage1Cache(root)
    key = cache.key(cfg, dataset_dir)
    with cache.claim(key):                       # one trainer per key at a time
        entry = cache.get(key) or train_and_put(...)

`TrialCache` does the same for whole trials, keyed by the complete configuration.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from hilomoe.config import TrainConfig
from hilomoe.data.dataset import META_FILE, open_dataset
from hilomoe.engine.loop import EpochRecord
from hilomoe.session import load_tensors
from hilomoe.study.space import config_key

WEIGHTS, RECORDS = "base.pt", "entry.json"


def dataset_fingerprint(path: str | Path) -> str:
    """The dataset's description plus the size and modification time of every data file: a
    regenerated or edited dataset gets a new fingerprint."""
    ds = open_dataset(path, check_shards=False)
    h = hashlib.sha256((ds.path / META_FILE).read_bytes())
    for split in ds.meta.splits:
        for f in ds.files(split):
            st = f.stat()
            h.update(f"{split}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


class KeyedStore:
    """Directories by content key under `root`: written aside and renamed into place (a reader
    sees a whole entry or none), with one lock per key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def write(self, key: str, files: dict[str, object]) -> None:
        """`files`: name -> object (`.json` names as JSON, others with torch.save)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        for name, obj in files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj))
            else:
                torch.save(obj, tmp / name)
        try:
            os.rename(tmp, self.path(key))
        except OSError:  # another process stored the same key first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the key's lock: a second trial with the same key waits here, then finds the
        first one's entry instead of computing it again."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class Stage1Entry:
    weights: dict  # the base parameters' state dict (stage 1's best epoch)
    history: list[EpochRecord]  # stage 1's epochs, as the trial that trained it saw them
    seconds: float  # training and validation seconds the entry cost (saved by every reuse)


class Stage1Cache(KeyedStore):
    @staticmethod
    def key(cfg: TrainConfig, dataset: str | Path) -> str:
        return _hash({
            "dataset": dataset_fingerprint(dataset),
            "seed": cfg.seed,
            "embedding_dim": cfg.model.embedding_dim,
            "embedding": cfg.model.embedding.model_dump(mode="json"),
            "backbone": cfg.model.backbone.model_dump(mode="json"),
            "stage": cfg.stages.base.model_dump(mode="json"),
            "shuffle_buffer": cfg.ray.shuffle_buffer,
            "train_subset": [cfg.data.train_fraction, cfg.data.subset_seed],
        })

    def get(self, key: str) -> Stage1Entry | None:
        d = self.path(key)
        if not (d / RECORDS).is_file():
            return None
        meta = json.loads((d / RECORDS).read_text())
        return Stage1Entry(load_tensors(d / WEIGHTS),
                           [EpochRecord(**r) for r in meta["history"]], meta["seconds"])

    def put(self, key: str, entry: Stage1Entry) -> None:
        self.write(key, {WEIGHTS: entry.weights, RECORDS: {
            "history": [asdict(r) for r in entry.history], "seconds": entry.seconds}})


class TrialCache(KeyedStore):
    """Finished trials by their whole configuration: a sampler that proposes a configuration
    again (TPE does, in small discrete spaces) gets the earlier result instead of a retrain."""

    STATE, SUMMARY = "state.pt", "summary.json"

    @staticmethod
    def key(cfg: TrainConfig, dataset: str | Path) -> str:
        return _hash({"dataset": dataset_fingerprint(dataset), "config": config_key(cfg)})

    def get(self, key: str) -> tuple[dict, dict] | None:
        d = self.path(key)
        if not (d / self.SUMMARY).is_file():
            return None
        return (load_tensors(d / self.STATE),
                json.loads((d / self.SUMMARY).read_text()))

    def put(self, key: str, state: dict, summary: dict) -> None:
        self.write(key, {self.STATE: state, self.SUMMARY: summary})
