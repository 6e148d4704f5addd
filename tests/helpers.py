"""Helpers shared by test modules: the `hilomoe` command in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import psutil


def hilomoe(*args: str, check: bool = True, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hilomoe", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def load_golden():
    """tests/golden/convert/golden.py as a module: the frozen converter inputs and outputs."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "golden_convert", Path(__file__).parent / "golden" / "convert" / "golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planted_dataset(tmp_path_factory, train: dict):
    """The planted dataset of a training configuration's `data.synth`, written once."""
    from hilomoe.config import parse_config
    from hilomoe.data.synth import write_synth
    path = tmp_path_factory.mktemp("data") / "ds"
    write_synth(parse_config(train).data.synth, path)
    return path


def on_dataset(train: dict, dataset, **overrides):
    """The training configuration reading `dataset`, with dotted-key overrides."""
    from hilomoe.config import parse_config
    return parse_config(train).with_overrides(**{"data.path": str(dataset), **overrides})


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


def handwritten(out, cat=None, num=None, label=None, valid_label=None, vocab=50, rows=200,
                null_vocab=False):
    """A small dataset written as any hand-made Parquet could be (no conversion's checks): the
    train split holds `cat`, `num`, `label` where given, else good values; every field C0-C2 has
    `vocab` ids, N0-N1 are numeric."""
    from hilomoe.data.dataset import META_FILE, DatasetMeta, DatasetWriter, FieldInfo

    rng = np.random.default_rng(0)
    good = (rng.integers(0, vocab, (rows, 3)), rng.standard_normal((rows, 2)).astype(np.float32),
            (np.arange(rows) % 2).astype(np.float32))
    train = tuple(g if v is None else np.asarray(v) for g, v in zip(good, (cat, num, label)))
    fields = [FieldInfo(name=f"C{i}", type="categorical", vocab_size=vocab) for i in range(3)]
    fields += [FieldInfo(name=f"N{i}", type="numeric") for i in range(2)]
    with DatasetWriter(out, 3, 2, rows_per_file=rows) as w:
        w.write("train", *train)
        w.write("valid", *good[:2], good[2] if valid_label is None else valid_label)
        w.write("test", *good)
        w.close(DatasetMeta(name="hand", source_format="parquet", fields=fields, splits={}))
    if null_vocab:
        meta = json.loads((out / META_FILE).read_text())
        meta["fields"][1]["vocab_size"] = None
        (out / META_FILE).write_text(json.dumps(meta))
    return out


def with_value(shape, index, value, dtype):
    """Zeros (good ids, numerics and labels) but `value` at `index`."""
    a = np.zeros(shape, dtype)
    a[index] = value
    return a
