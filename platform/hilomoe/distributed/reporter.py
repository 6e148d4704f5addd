"""A session's reports as Ray's: `report(metrics, checkpoint=...)` of Ray Train (a worker) or
Ray Tune (a study trial), with the session's checkpoint files in a temporary directory.

    Session(cfg, data, RayReporter(ray.train, progress, rank)).run()     # a Ray Train worker
    Session(cfg, data, RayReporter(ray.tune)).run()                      # a one-worker trial

Imports no Ray itself: the caller hands over the module it reports through.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hilomoe.engine.history import EpochRecord
from hilomoe.session import read_state, write_files


@contextlib.contextmanager
def checkpoint_dir(files: dict[str, Any]) -> Iterator[Path | None]:
    """A temporary directory holding `files` (see `session.write_files`), for
    `Checkpoint.from_directory`; None when there is nothing to save."""
    if not files:
        yield None
        return
    with tempfile.TemporaryDirectory() as d:
        write_files(files, Path(d))
        yield Path(d)


def read_checkpoint(checkpoint) -> tuple[dict | None, dict | None]:
    """The engine state (every rank's shard merged) and, in a final checkpoint, the summary."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        return read_state(d)


class RayReporter:
    """A session's reports as `report(metrics, checkpoint=...)` of Ray Train or Ray Tune
    (`module`); every rank reports the same number of times, each with its own files. Rank 0
    also puts each epoch on `progress` (a queue for the driver's console), if given."""

    def __init__(self, module, progress=None, rank: int = 0):
        self.module, self.progress, self.rank = module, progress, rank

    def restore(self) -> dict | None:
        return read_checkpoint(self.module.get_checkpoint())[0]

    def report(self, metrics: dict, files: dict, record: EpochRecord | None) -> None:
        with checkpoint_dir(files) as d:
            ckpt = self.module.Checkpoint.from_directory(d) if d else None
            self.module.report(metrics, checkpoint=ckpt)
        if record is not None and self.rank == 0 and self.progress is not None:
            _put(self.progress, {"kind": "epoch", **metrics, "valid": record.valid,
                                 "train": record.train})


def _put(queue, item: dict) -> None:
    try:
        queue.put_nowait(item)
    except Exception:  # a full or vanished console queue must never stop training
        pass
