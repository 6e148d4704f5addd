"""The stage engine: losses, metrics, the three-stage recipe and its step/epoch loop (no Ray)."""

from hilomoe.engine.history import EarlyStopping, EpochRecord
from hilomoe.engine.loop import BatchSource, Engine, run_stages
from hilomoe.metrics import auc, logloss

__all__ = ["BatchSource", "EarlyStopping", "Engine", "EpochRecord", "auc", "logloss", "run_stages"]
