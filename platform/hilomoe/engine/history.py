"""What a stage's training leaves behind: one record per epoch, the stage's best epoch, and the
early-stopping state that decides when a stage ends (engine/loop.py writes them; sessions,
reporters and the caches read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without the validation AUC improving by more than min_delta."""

    patience: int
    min_delta: float = 0.0
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True when it is the best so far. An undefined score (NaN:
        the AUC of a batch-less or one-class split) is never the best: it would also stop every
        later epoch from improving on it, since nothing compares greater than NaN."""
        if score != score:
            self.bad_epochs += 1
            return False
        if score > self.best + self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class EpochRecord:
    stage: str
    epoch: int
    train: dict[str, float]  # mean loss and its parts
    valid: dict[str, float]  # auc, logloss and routing statistics
    samples: int
    seconds: float
    improved: bool

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


@dataclass
class StageResult:
    """A stage's epochs and its best epoch (the weights the next stage starts from)."""

    stage: str
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def best(self) -> EpochRecord | None:
        improved = [r for r in self.history if r.improved]
        return improved[-1] if improved else None

    def summary(self) -> dict:
        best = self.best
        return {"epochs": len(self.history),
                "auc": best.valid["auc"] if best else float("nan"),
                "logloss": best.valid["logloss"] if best else float("nan"),
                "best_epoch": best.epoch if best else -1}


def stage_results(history: Iterable[EpochRecord]) -> dict[str, StageResult]:
    """Group epoch records by stage, in the order the stages ran."""
    out: dict[str, StageResult] = {}
    for record in history:
        out.setdefault(record.stage, StageResult(record.stage)).history.append(record)
    return out
