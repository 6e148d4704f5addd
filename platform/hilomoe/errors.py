"""The one exception type the command line turns into a single clear sentence (no stack trace)."""


class HilomoeError(Exception):
    """Bad input or an impossible request; the message is meant for a person, as is.

    The message is kept apart from `args`: Ray Data appends its retry advice to the `args` of
    an error raised in a read task, which would turn the sentence into a paragraph.
    """

    def __init__(self, message: str = "", *args: object):
        super().__init__(message, *args)
        self.message = message  # pickled with the instance's __dict__, so it survives Ray

    def __str__(self) -> str:
        return self.message if isinstance(getattr(self, "message", None), str) \
            else super().__str__()


class DatasetError(HilomoeError):
    """A dataset directory, shard or description that cannot be used."""


def hilomoe_cause(err: BaseException | None) -> HilomoeError | None:
    """The HilomoeError behind `err`, or None: raised in a Ray task or worker (a read task
    checking a shard, a training worker), it reaches the driver wrapped, as a RayTaskError
    whose text is a whole traceback, or chained under Ray Data's and Ray Train's own errors.
    The original, whose message is one sentence, is the RayTaskError's `cause`."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(e, HilomoeError) and not isinstance(inner, BaseException):
            return e
        todo += [inner if isinstance(inner, BaseException) else None, e.__cause__,
                 e.__context__]
    return None


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
