"""This process's peak resident memory, as benchmarks report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """The high-water mark of this process's resident memory since it started its program, in
    MiB: Linux's VmHWM. `ru_maxrss` is not used where VmHWM exists, because it also counts the
    memory of the parent before `exec` (a process started by a large one looks large)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
