"""Data: the batch type, in-memory sources, and the planted synthetic problem.

`Batch` and `TensorBatches` load on first use: Ray's read-task processes import submodules
(`hilomoe.data.parquet`, from `hilomoe.distributed.ray_source`) that must not pull torch in.
"""

__all__ = ["Batch", "TensorBatches"]


def __getattr__(name: str):
    if name in __all__:
        from hilomoe.data import batches

        return getattr(batches, name)
    raise AttributeError(f"module 'hilomoe.data' has no attribute {name!r}")
