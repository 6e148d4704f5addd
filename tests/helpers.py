"""Helpers shared by test modules: the `hilomoe` command in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil


def hilomoe(*args: str, check: bool = True, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hilomoe", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process this test started and everything it started (a driver and its local Ray),
    by PID: nothing else on the machine."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def submit_job(submit: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    """`ray job submit ...`, retried while the head's job agent is still starting (it comes up
    a few seconds after the head)."""
    import time

    for _ in range(30):
        proc = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env,
                              cwd=cwd)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    return proc
