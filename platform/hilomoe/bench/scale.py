"""`hilomoe bench scale`: training and conversion at real CTR vocabularies, side by side.

Criteo-shaped planted data (26 categorical + 13 numeric fields) at several vocabulary sizes
(20, 10k and 100k ids per field by default: 520 to 2.6M embedding rows), trained by the same
model (embedding 16, MLP [64, 32], one cross layer, HiLoMoE L=2 K=8, one epoch per stage)
through every path and embedding backend:

    path     local (`hilomoe train --local`), ray_1 and ray_2 (Ray Train, 1 and 2 workers)
    backend  torchrec (FBGEMM fused row-wise Adagrad; tables sharded across workers)
             torch (one sparse nn.Embedding, sparse row-wise Adagrad; replicated, DDP)

Each run is its own `hilomoe train ... --json` process, started one after the other from this
one, so each starts with a clean heap: its rows give samples/s per stage (train samples over
the stage's train seconds), and the peak RSS and embedding bytes (tables plus their optimiser
state) of its busiest worker. Then the converter on a Criteo TSV of the same shape, against
`pyarrow.csv`'s read of the same file (bench/convert.py).

Goals (the real-scale issue): at 100k ids the torchrec backend keeps at least 0.7x of its
20-id samples/s in every stage of every path, and two workers hold at most 0.6x of one
worker's embedding bytes each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from hilomoe.errors import HilomoeError

PATHS = ("local", "ray_1", "ray_2")
BACKENDS = ("torchrec", "torch")
IDS = (20, 10_000, 100_000)
STAGES = ("base", "experts", "joint")


def criteo_like(ids_per_field: int, train_rows: int, data_path: str | None = None,
                backend: str = "torchrec", epochs: int = 1) -> dict:
    """The bench's training configuration (also `studies/criteo_like.yaml`'s model)."""
    rows = int(train_rows / 0.8)
    data = ({"path": data_path} if data_path else
            {"synth": {"rows": rows, "categorical_fields": 26, "numeric_fields": 13,
                       "vocab_size": ids_per_field, "depth": 2, "branching": 4,
                       "valid_fraction": 0.1, "test_fraction": 0.1, "seed": 0}})
    stage = {"epochs": epochs, "patience": epochs, "batch_size": 1024}
    return {
        "seed": 0, "data": data,
        "model": {"embedding_dim": 16, "embedding": {"backend": backend},
                  "backbone": {"mlp": [64, 32], "cross_layers": 1},
                  "moe": {"variant": "hilomoe", "levels": 2, "experts": 8, "top_k": 2}},
        "stages": {"base": {**stage, "lr": 0.002}, "experts": {**stage, "lr": 0.002},
                   "joint": {**stage, "lr": 0.001}},
        "eval_batch_size": 8192,
    }


@dataclass
class Row:
    path: str
    backend: str
    ids_per_field: int
    stage: str
    samples_per_s: float
    peak_rss_mb: float  # the busiest worker's (the process, for local)
    embedding_bytes: int  # the largest worker share: tables + their optimiser state
    workers: int


def _train(cfg_path: Path, path: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hilomoe", "train", str(cfg_path), "--json"]
    cmd += ["--local"] if path == "local" else ["--workers", path.split("_")[1], "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray per run
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise HilomoeError(f"bench scale: {path} training failed: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(summary: dict, path: str, backend: str, ids: int) -> list[Row]:
    workers = summary.get("footprint") or [{}]
    rss = max(w.get("peak_rss_mb", 0.0) for w in workers)
    emb = max(w.get("embedding_bytes", 0) for w in workers)
    out = []
    for stage in STAGES:
        hist = [h for h in summary["history"] if h["stage"] == stage]
        seconds = sum(h["seconds"] for h in hist)
        sps = sum(h["samples"] for h in hist) / seconds if seconds else 0.0
        out.append(Row(path, backend, ids, stage, sps, rss, emb, len(workers)))
    return out


def run(ids: tuple[int, ...] = IDS, paths: tuple[str, ...] = PATHS,
        backends: tuple[str, ...] = BACKENDS, train_rows: int = 300_000,
        convert_rows: int = 300_000, workdir: str | None = None, log=print) -> dict:
    from hilomoe.config import PlantedData
    from hilomoe.data.synth import write_synth

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hilomoe-bench-scale-", dir=workdir) as tmp:
        tmp = Path(tmp)
        for n_ids in ids:
            data = tmp / f"data-{n_ids}"
            spec = criteo_like(n_ids, train_rows)["data"]["synth"]
            log(f"writing {spec['rows']:,} Criteo-shaped planted rows, {n_ids:,} ids per field")
            write_synth(PlantedData(**spec), data)
            for backend in backends:
                cfg = tmp / f"cfg-{n_ids}-{backend}.yaml"
                cfg.write_text(yaml.safe_dump(criteo_like(n_ids, train_rows, str(data), backend)))
                for path in paths:
                    log(f"training: {path}, {backend}, {n_ids:,} ids per field")
                    summary = _train(cfg, path, tmp / f"run-{n_ids}-{backend}-{path}")
                    rows += _rows(summary, path, backend, n_ids)
            import shutil

            shutil.rmtree(data)
        convert = {}
        if convert_rows:
            from hilomoe.bench import convert as convert_bench

            log(f"converting a {convert_rows:,}-row Criteo TSV")
            convert = convert_bench.run(rows=convert_rows, ids_per_field=max(ids), workdir=str(tmp))
    return {"rows": [asdict(r) for r in rows], **_convert_fields(convert),
            "goals": goals(rows)}


def _convert_fields(result: dict) -> dict:
    keys = ("convert_rows_per_s", "pyarrow_csv_rows_per_s", "convert_peak_rss_mb")
    return {k: result.get(k) for k in keys} | {"convert": result}


def goals(rows: list[Row]) -> dict:
    """The issue's ratios: torchrec's samples/s at the most ids over the fewest, per path and
    stage; and per backend, ray_2's embedding bytes per worker over ray_1's."""
    by = {(r.path, r.backend, r.ids_per_field, r.stage): r for r in rows}
    ids = sorted({r.ids_per_field for r in rows})
    out: dict = {"torchrec_speed_ratio": {}, "bytes_ratio_2_over_1": {}}
    if len(ids) > 1:
        lo, hi = ids[0], ids[-1]
        for (path, backend, n, stage), r in by.items():
            if backend == "torchrec" and n == hi and (path, backend, lo, stage) in by:
                base = by[(path, backend, lo, stage)].samples_per_s
                out["torchrec_speed_ratio"][f"{path}/{stage}"] = (
                    r.samples_per_s / base if base else None)
    for (path, backend, n, stage), r in by.items():
        if path == "ray_2" and stage == "base" and ("ray_1", backend, n, stage) in by:
            one = by[("ray_1", backend, n, stage)].embedding_bytes
            out["bytes_ratio_2_over_1"][f"{backend}/{n}"] = r.embedding_bytes / one if one else None
    return out
