"""A buffered-retry MLflow client: calls that fail while MLflow is down wait and are replayed.

    client = BufferedClient(uri, on_warning=print, retry_every_s=10)
    client.submit(Op("the metrics of run x", [write]))   # write() calls client._c().log_batch
    client.flush()                       # True once nothing waits

Each call becomes an operation (`Op`): steps tried at once, in order. When MLflow fails (server
down, timeout, locked database), that operation and every later one wait, in order, in an
in-memory buffer; `on_warning` hears one sentence; a later `submit` retries the buffer at most
every `retry_every_s` seconds. A refusal that no retry can cure (an invalid value, a run that
does not exist, a step raising `Skip`) skips that one step with a warning instead of holding up
the rest. An operation remembers the steps it finished, so a replay resumes where it stopped.

Knows nothing of studies or runs: tracking/runs.py maps a study onto it.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from pathlib import Path

# Set before MLflow is imported or asked anything: a dead server must cost seconds, not minutes.
_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not the database-migration INFO lines
}
# MLflow error codes that a retry cannot cure: the step is skipped, not buffered.
_PERMANENT_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST",
})
# Errors of these libraries are outages too (a locked database, a dropped connection).
_TRANSPORT_MODULES = frozenset({"sqlalchemy", "sqlite3", "requests", "urllib3", "http"})


def set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default: `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def now_ms() -> int:
    return int(time.time() * 1000)


class Skip(Exception):
    """A step that can never succeed (e.g. the run it writes to was never created)."""


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _kind(exc: BaseException) -> str:
    """'outage' (buffer and retry), 'refused' (retrying cannot help: skip the step), or
    'unclear' (an error of some other kind: a probe of MLflow decides)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, Skip):
        return "refused"
    if isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES:
        return "refused"
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return "outage"
        if type(e).__module__.split(".")[0] in _TRANSPORT_MODULES:
            return "outage"            # requests, urllib3, a locked or full SQLite database
        if isinstance(e, MlflowException) and (
                e.error_code == "TEMPORARILY_UNAVAILABLE"
                or ("API request to" in str(e) and "failed with exception" in str(e))):
            return "outage"
    return "unclear"


def reason(exc: BaseException) -> str:
    """A short cause for a warning: the innermost error's type and first line."""
    inner: BaseException = exc
    seen = {id(inner)}
    while True:
        nxt = inner.__cause__ or inner.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in type(inner).__name__.lower():
        return "Timeout: no answer in time"
    if any(s in text for s in ("NewConnectionError", "Connection refused",
                               "Failed to establish")):
        return "ConnectionError: connection refused"
    if "Max retries exceeded" in text:
        return "ConnectionError: no answer"
    first = (str(inner) or type(inner).__name__).splitlines()[0]
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(inner).__name__}: {first}"


def guarded(method):
    """A public call of a BufferedClient never raises: an unexpected error is one warning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._warn(f"Recording to MLflow failed in {method.__name__} ({reason(exc)}); "
                       f"{self.GOES_ON}.")
            return None

    return wrapper


class Op:
    """One public call: steps run in order; `done` survives a failure so a replay resumes.

    `batch`: items (e.g. MLflow Metric objects) that the steps write and drain; a later
    operation with the same `batch_key` joins its batch while it waits and nothing of it was
    written (one write on replay instead of many). `on_queue` runs once when the operation
    starts waiting (e.g. to copy what it writes as it is at the call)."""

    def __init__(self, what: str, steps: list[Callable[[], None]],
                 batch_key: Hashable | None = None):
        self.what = what
        self.steps = steps
        self.batch_key = batch_key
        self.batch: list = []
        self.done = 0
        self.calls = 1                       # public calls merged into this operation
        self.on_queue: Callable[[], None] | None = None


class BufferedClient:
    """An MLflow client at `uri` whose operations wait in order while MLflow is down.

    `on_warning` hears one sentence when MLflow becomes unreachable, one when the buffer is
    written again, and one per kind of refused value. `pending` counts the calls waiting in
    the buffer; `lost` the steps skipped for good.
    """

    GOES_ON = "the work goes on"                     # what a warning says happens next
    OUTAGE_NOTE = "calls are buffered and replayed once it answers."
    MAX_BATCH = 1000                                 # MLflow's log_batch limit on metrics

    def __init__(self, uri: str | None = None, on_warning: Callable[[str], None] | None = None,
                 retry_every_s: float = 10.0):
        set_env_defaults()
        self.uri = uri or tracking_uri()
        self.retry_every_s = float(retry_every_s)
        self._on_warning = on_warning
        self._client = None
        self._buffer: deque[Op] = deque()
        self._down = False
        self._next_retry = 0.0
        self.lost = 0                        # steps skipped for good
        self._replayed = 0                   # buffered calls written since the outage began
        self._refusals: set[str] = set()
        self._lock = threading.RLock()

    @property
    def healthy(self) -> bool:
        """True while nothing waits in the buffer."""
        return not self._buffer and not self._down

    @property
    def pending(self) -> int:
        """How many public calls wait in the buffer (not yet fully written)."""
        return sum(op.calls for op in self._buffer)

    def _warn(self, sentence: str) -> None:
        if self._on_warning is None:
            return
        try:
            self._on_warning(sentence)
        except Exception:  # a broken callback must not stop the work either
            pass

    def _c(self):
        """The `mlflow.MlflowClient`, made on first use."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _run_op(self, op: Op) -> None:
        """Runs the remaining steps; an outage propagates, a permanent refusal skips its step."""
        while op.done < len(op.steps):
            try:
                op.steps[op.done]()
            except Exception as exc:
                kind = _kind(exc)
                if kind == "unclear":
                    kind = "refused" if self._reachable() else "outage"
                if kind == "outage":
                    raise
                self.lost += 1
                cause = reason(exc)
                if cause not in self._refusals:    # one warning per kind of refusal
                    self._refusals.add(cause)
                    self._warn(f"MLflow refused to record {op.what} ({cause}); that part is "
                               f"skipped and {self.GOES_ON}.")
            op.done += 1

    def _reachable(self) -> bool:
        """Whether MLflow answers at all: a step that failed while it does is refused for good."""
        try:
            self._c().search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def submit(self, op: Op) -> None:
        """Runs `op` now, or queues it behind what waits already (in call order)."""
        with self._lock:
            if self._buffer and (time.monotonic() < self._next_retry or not self._drain()):
                self._enqueue(op)
                return
            try:
                self._run_op(op)
            except Exception as exc:
                self._enqueue(op)
                self._went_down(exc)

    def _enqueue(self, op: Op) -> None:
        last = self._buffer[-1] if self._buffer else None
        if (op.batch_key is not None and last is not None and last.batch_key == op.batch_key
                and last.done == 0 and len(last.batch) + len(op.batch) <= self.MAX_BATCH):
            last.batch.extend(op.batch)
            last.calls += 1
            return
        if op.on_queue is not None:
            op.on_queue()
            op.on_queue = None
        self._buffer.append(op)

    def _went_down(self, exc: BaseException) -> None:
        self._next_retry = time.monotonic() + self.retry_every_s
        if not self._down:
            self._down = True
            self._warn(f"MLflow at {self.uri} is unreachable ({reason(exc)}); "
                       f"{self.OUTAGE_NOTE}")

    def _drain(self) -> bool:
        """Replays the buffer in order; stops at the first outage. True once it is empty."""
        while self._buffer:
            op = self._buffer[0]
            try:
                self._run_op(op)
            except Exception:
                self._next_retry = time.monotonic() + self.retry_every_s
                self._down = True
                return False
            self._buffer.popleft()
            self._replayed += op.calls
        if self._down:
            self._down = False
            self._warn(f"MLflow is reachable again; {self._replayed} buffered operations were "
                       "written.")
        self._replayed = 0
        return True

    def flush(self) -> bool:
        """Tries to write the buffer now; True when nothing is left waiting."""
        with self._lock:
            try:
                return self._drain()
            except Exception:
                return False
