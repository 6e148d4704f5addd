"""A trained model as an MLflow 3 LoggedModel of an existing run, through `mlflow.pytorch`.

    log_pytorch_model(client, uri, run_id, model, name="model", input_example=x, ...)

MLflow offers model logging only through its fluent API (one global tracking URI, one stack of
active runs); this module borrows both for the call and puts them back, so that the rest of
tracking/ keeps explicit run ids. torch and `mlflow.pytorch` are imported here, inside the
functions: importing tracking/ costs neither.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from hilomoe.tracking.retry import now_ms

# "pickle": "pt2" would export the routing's custom kernel; MLflow's warnings about pickle and
# about the environment say nothing the study can act on.
_QUIET = ("mlflow.pytorch", "mlflow.models.model", "mlflow.models.signature")


def log_pytorch_model(client, uri: str, run_id: str, model, name: str, input_example: Any,
                      metrics: dict[str, float], params: dict[str, str], tags: dict[str, str],
                      register: str | None) -> None:
    """`model` (a torch.nn.Module) under `run_id`, its signature inferred from `input_example`,
    `params` and `tags` on the model, registered as `register` when given; `metrics` (final
    values, step 0) are logged on the run linked to the model. The run's status is unchanged."""
    import mlflow.pytorch
    from mlflow.entities import Metric

    before = client.get_run(run_id).info.status
    with _fluent_run(uri, run_id), _quiet(_QUIET):
        info = mlflow.pytorch.log_model(
            model, name=name, pip_requirements=_pip_requirements(),
            serialization_format="pickle", input_example=input_example,
            params=params or None, tags=tags or None, registered_model_name=register,
            step=-1)  # no study metric sits at step -1: none is linked to the model
    if metrics:
        ts = now_ms()
        client.log_batch(run_id, metrics=[Metric(k, v, ts, 0, model_id=info.model_id)
                                          for k, v in metrics.items()], synchronous=True)
    if before != "RUNNING":                    # start_run set it RUNNING; put it back
        client.update_run(run_id, status=before)


@contextlib.contextmanager
def _fluent_run(uri: str, run_id: str) -> Iterator[None]:
    """`run_id` as the fluent API's active run at `uri`; the global URI, MLFLOW_TRACKING_URI
    and the run stack are as they were afterwards."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = getattr(tracking_utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)          # the fluent API only knows the global URI
    pushed = False
    try:
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        pushed = True
        yield
    finally:
        if pushed:
            # Leave the fluent run stack without `end_run`: that would mark the run FINISHED
            # (and, on a dead server, raise and leave the run on the stack).
            stack = fluent._active_run_stack.get()
            if stack and stack[-1].info.run_id == run_id:
                stack.pop()
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The loggers `names` at ERROR for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [q.level for q in loggers]
    for q in loggers:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(loggers, levels):
            q.setLevel(level)


def _pip_requirements() -> list[str]:
    """Explicit requirements, so MLflow does not spend seconds inferring them."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import cloudpickle

        reqs.append(f"cloudpickle=={cloudpickle.__version__}")
    except ImportError:
        pass
    return reqs
