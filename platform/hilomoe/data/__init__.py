"""Data: the batch type, in-memory sources, and the planted synthetic problem."""

from hilomoe.data.batches import Batch, TensorBatches

__all__ = ["Batch", "TensorBatches"]
