"""The one exception type the command line turns into a single clear sentence (no stack trace)."""


class HilomoeError(Exception):
    """Bad input or an impossible request; the message is meant for a person, as is."""


class DatasetError(HilomoeError):
    """A dataset directory, shard or description that cannot be used."""


def out_of_memory(err: BaseException) -> str | None:
    """One sentence for an allocation that failed (CPU or GPU), or None for other errors."""
    text = str(err)
    if type(err).__name__ != "OutOfMemoryError" and not (
            isinstance(err, RuntimeError) and ("can't allocate memory" in text
                                               or "out of memory" in text.lower())):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (f"out of memory ({first[:160]}); lower the batch size (stages.<stage>.batch_size, "
            f"eval_batch_size) or the model (model.backbone.mlp, model.embedding_dim, "
            f"model.moe.experts), or use a machine with more memory.")
