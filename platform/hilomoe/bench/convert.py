"""`hilomoe bench convert`: rows/s and peak memory of `hilomoe data convert` on a Criteo TSV.

    run(rows=1_000_000, ids_per_field=100_000) -> {"rows", "ids_per_field",
        "convert_rows_per_s", "convert_seconds", "convert_peak_rss_mb",
        "pyarrow_csv_rows_per_s", "pyarrow_csv_seconds", "process_seconds",
        "pass1_seconds", "pass2_seconds", "ray", "chunks", "input_mb"}

Writes a planted Criteo-shaped TSV (hilomoe.data.criteo_tsv: Zipf ids, `ids_per_field` possible
values per categorical field), then times:

    pyarrow_csv  `pyarrow.csv.read_csv` of the file (multi-threaded, types inferred): the
                 ceiling, a parse alone with nothing counted, encoded or written
    convert      `python -m hilomoe data convert --format criteo ... --json` in a subprocess:
                 rows/s over the conversion's own time (both passes and writing, as the command
                 reports it; `process_seconds` adds interpreter start-up), and the subprocess's
                 peak resident memory as it reports it (`hilomoe.memory.peak_rss_mb`: that
                 process alone, so with --ray the driver's, not the Ray workers'; the driver's
                 includes the object-store pages it has mapped)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.csv as pacsv

from hilomoe.data.criteo_tsv import write_criteo_tsv
from hilomoe.errors import HilomoeError


def _pyarrow_ceiling(path: Path) -> float:
    """Seconds `pyarrow.csv.read_csv` takes to read the TSV."""
    t0 = time.perf_counter()
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                           parse_options=pacsv.ParseOptions(delimiter="\t"))
    seconds = time.perf_counter() - t0
    del table
    return seconds


def _convert(src: Path, out: Path, logs: Path, ray: bool) -> tuple[dict, float]:
    """(the command's JSON result, wall seconds) of a conversion subprocess."""
    cmd = [sys.executable, "-m", "hilomoe", "data", "convert", "--format", "criteo", "--input",
           str(src), "--out", str(out), "--json"] + (["--ray"] if ray else [])
    env = dict(os.environ)
    if not ray:  # the single process, even where a cluster is at hand (see data.convert)
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        proc.wait()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (logs / "stderr").read_text(errors="replace")[-2000:]
        raise HilomoeError(f"the benchmarked conversion failed (exit {proc.returncode}): {tail}")
    return json.loads((logs / "stdout").read_text()), wall


def run(rows: int, ids_per_field: int, ray: bool = False, workdir=None) -> dict:
    """Write the planted TSV, time pyarrow's read and a full conversion (see the docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="hilomoe-bench-convert-", dir=workdir))
    try:
        src = write_criteo_tsv(tmp / "criteo.tsv", rows, ids_per_field, seed=0)
        result, wall = _convert(src, tmp / "dataset", tmp, ray)
        ceiling = _pyarrow_ceiling(src)
        seconds = result["seconds"]
        return {"rows": rows, "ids_per_field": ids_per_field, "ray": ray,
                "input_mb": src.stat().st_size / 2**20, "chunks": result["chunks"],
                "convert_rows_per_s": rows / seconds, "convert_seconds": seconds,
                "pass1_seconds": result["pass1_seconds"], "pass2_seconds": result["pass2_seconds"],
                "convert_peak_rss_mb": result["peak_rss_mb"], "process_seconds": wall,
                "pyarrow_csv_rows_per_s": rows / ceiling, "pyarrow_csv_seconds": ceiling}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
