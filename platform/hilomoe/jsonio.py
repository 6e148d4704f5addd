"""JSON that stays JSON: every file and line hilomoe writes goes through `dumps`.

Python's `json.dumps` writes a NaN or an infinity as the bare words `NaN` / `Infinity`, which
are not JSON: `jq`, JavaScript and most other readers refuse the whole file. An undefined
metric (the AUC of a split with one class) is a NaN, so every writer first turns non-finite
floats into `null`, then dumps with `allow_nan=False` so that a value this missed fails loudly
instead of writing an unreadable file.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from hilomoe.errors import HilomoeError


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-inf), however deeply nested, replaced by None;
    numpy floats become Python floats."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite(obj)`, never writing NaN or Infinity (other keywords as json's)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def read_dict(path: str | Path, missing: str) -> dict:
    """The JSON object in the file at `path` (a run's or a study's identity); HilomoeError
    `missing` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise HilomoeError(missing)
    return json.loads(path.read_text())
