"""The stage-1 cache: trials that share a base model and a dataset share one trained stage 1.

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


@dataclass
class Stage1Entry:
    weights: dict  # the base parameters' state dict (stage 1's best epoch)
    history: list[EpochRecord]  # stage 1's epochs, as the trial that trained it saw them
    seconds: float  # training and validation seconds the entry cost (saved by every reuse)


class Stage1Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(cfg: TrainConfig, dataset: str | Path) -> str:
        inputs = {
            "dataset": dataset_fingerprint(dataset),
            "seed": cfg.seed,
            "embedding_dim": cfg.model.embedding_dim,
            "backbone": cfg.model.backbone.model_dump(mode="json"),
            "stage": cfg.stages.base.model_dump(mode="json"),
            "shuffle_buffer": cfg.ray.shuffle_buffer,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]

    def _dir(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Stage1Entry | None:
        d = self._dir(key)
        if not (d / RECORDS).is_file():
            return None
        meta = json.loads((d / RECORDS).read_text())
        return Stage1Entry(torch.load(d / WEIGHTS, weights_only=True),
                           [EpochRecord(**r) for r in meta["history"]], meta["seconds"])

    def put(self, key: str, entry: Stage1Entry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        torch.save(entry.weights, tmp / WEIGHTS)
        (tmp / RECORDS).write_text(json.dumps(
            {"history": [asdict(r) for r in entry.history], "seconds": entry.seconds}))
        try:
            os.rename(tmp, self._dir(key))
        except OSError:  # another process stored the same key first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the key's lock: a second trial with the same base waits here, then finds the
        first one's entry instead of training stage 1 again."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
