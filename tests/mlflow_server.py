"""A real `mlflow server` for tests: on 127.0.0.1, SQLite and artifacts under a test directory,
stopped by its handle (the process and the workers it started, by PID; never by name).

    proc, url = start_mlflow_server(tmp_path)
    try: ...
    finally: stop_mlflow_server(proc)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(tmp_path: Path, port: int | None = None,
                        timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Starts `mlflow server` (backend `tmp_path/mlflow.db`, artifacts `tmp_path/mlartifacts`)
    and waits until `GET /health` answers. A second call with the same `tmp_path` and port
    restarts the same store. Returns the process and its URL."""
    tmp_path = Path(tmp_path)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / f"mlflow-server-{port}.log", "ab")
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}",
           "--artifacts-destination", str(artifacts.resolve()),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    try:
        wait_healthy(url, proc, timeout)
    except RuntimeError:
        stop_mlflow_server(proc)
        tail = (tmp_path / f"mlflow-server-{port}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server on {url} did not become healthy:\n{tail}") from None
    return proc, url


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until `GET url/health` answers; RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _healthy(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server on {url} did not become healthy")


def stop_mlflow_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminates the server and the processes it started (found by its PID), then waits."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
