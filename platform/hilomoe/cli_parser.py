"""The `hilomoe` command line: every subcommand, its flags, help text and an example.

Each subcommand names its handler (`handler`: a function of `hilomoe.cli`, or `module:function`);
flag values are checked by the `type=` validators of `hilomoe.argtypes` as the command line is
parsed, so a bad value ends in one sentence and exit status 2 before any command runs.
"""

from __future__ import annotations

import argparse
import re

from hilomoe import __version__
from hilomoe.argtypes import (VALIDATORS, duration, non_negative_int, positive_float,
                              positive_int, size)


class _Parser(argparse.ArgumentParser):
    """A value a validator refuses ends like every other bad input: `hilomoe: error: --flag:
    why`, one line, exit status 2. argparse's own errors (an unknown flag, a missing argument)
    keep its usage line. Subparsers are of this class too (argparse makes them so)."""

    def error(self, message: str):
        m = re.fullmatch(r"argument (--[\w-]+): (.*)", message, re.S)
        if m and any(m[1] in a.option_strings and a.type in VALIDATORS for a in self._actions):
            self.exit(2, f"hilomoe: error: {m[1]}: {m[2]}\n")
        super().error(message)


def _command(group, name: str, handler: str, help: str, description: str, example: str,
             config: bool = True) -> argparse.ArgumentParser:
    """A subcommand with its description, an example, and the flags every command shares."""
    p = group.add_parser(name, help=help, description=description,
                         epilog=f"example:\n  {example}",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("config", help="training configuration (YAML)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=handler)
    return p


def _group(sub, name: str, help: str, description: str, example: str):
    """A command that only groups subcommands (`hilomoe model ...`)."""
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(
        dest=f"{name}_command", metavar="COMMAND", required=True)


def build_parser() -> argparse.ArgumentParser:
    """`hilomoe` and its command groups; `args.handler` names the function that runs."""
    p = _Parser(
        prog="hilomoe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and study HiLoMoE (Hierarchical LoRA MoE) CTR models.",
        epilog="example:\n  hilomoe study run studies/quickstart.yaml\n"
               "  hilomoe ui\n"
               "  hilomoe train studies/train_example.yaml --local",
    )
    p.add_argument("--version", action="version", version=f"hilomoe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_model, _add_train, _add_data, _add_bench, _add_study, _add_cache, _add_ui):
        add(sub)
    return p


def _add_model(sub) -> None:
    """`hilomoe model summary`."""
    model_sub = _group(sub, "model", "inspect a model configuration",
                       "Inspect the model a training configuration describes.",
                       "hilomoe model summary studies/train_example.yaml")
    s = _command(
        model_sub, "summary", "cmd_model_summary",
        help="parameters and per-sample FLOPs (analytic and measured)",
        description="Parameters (total, active per sample, embedding) and per-sample forward "
                    "FLOPs of the configured model, analytic and measured by torch's "
                    "FlopCounterMode, on the dataset's real vocabularies when data.path is "
                    "set; and the bytes of embedding tables and their optimiser state each "
                    "worker holds (TorchRec's sharding plan for --workers N).",
        example="hilomoe model summary studies/train_example.yaml --json",
    )
    s.add_argument("--routing", choices=["sparse", "dense", "off"], default="sparse",
                   help="routing mode to count (default: sparse, the deployed model)")
    s.add_argument("--batch", type=positive_int, default=None, help="batch size (default: eval_batch_size)")
    s.add_argument("--workers", type=positive_int, default=None,
                   help="report embedding bytes per worker for this many Ray Train workers "
                        "(default: ray.workers)")


def _add_train(sub) -> None:
    """`hilomoe train`: local, on Ray Train, or resumed."""
    t = _command(
        sub, "train", "cmd_train", config=False, help="train through the three stages",
        description="Train base -> experts -> joint, printing each epoch's validation AUC and "
                    "logloss, then the test metrics of the final model. Runs on Ray Train: "
                    "joins the cluster at RAY_ADDRESS (or of `ray job submit`), else starts a "
                    "local Ray. --local trains in this process without Ray.",
        example="hilomoe train studies/train_example.yaml --workers 2 --out runs/example\n"
                "  hilomoe train --resume runs/example\n"
                "  hilomoe train studies/train_example.yaml --local --json",
    )
    t.add_argument("config", nargs="?", help="training configuration (YAML)")
    t.add_argument("--local", action="store_true", help="train in this process, without Ray")
    t.add_argument("--data", metavar="DIR", help="a canonical dataset directory (overrides "
                   "the configuration's data section)")
    t.add_argument("--workers", type=positive_int, default=None, help="Ray Train workers (DDP ranks)")
    t.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/CONFIG-TIME)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last "
                   "checkpoint")
    t.add_argument("--storage", metavar="URI", help="checkpoint storage (directory or URI; "
                   "default DIR/checkpoints)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--reader", choices=["ray_data", "parquet"], default=None,
                   help="how workers read data: Ray Data shards (default) or pyarrow over "
                        "their own rows of the files (faster; the path must be visible to all)")
    t.add_argument("--max-failures", type=non_negative_int, default=None,
                   help="worker-group restarts before the run fails")


def _add_data(sub) -> None:
    """`hilomoe data synth | convert`."""
    data_sub = _group(sub, "data", "create and convert datasets",
                      "Write the planted synthetic problem, or convert public CTR data, into "
                      "the canonical dataset format (Parquet shards + dataset.json).",
                      "hilomoe data convert --format criteo --input train.txt --out data/criteo")
    d = _command(
        data_sub, "synth", "cmd_data_synth", config=False,
        help="write the planted synthetic problem as a canonical dataset",
        description="Stream planted rows (Zipf ids, a tree of latent segments, known click "
                    "probabilities) into DIR as Parquet shards plus dataset.json, which records "
                    "each split's Bayes-optimal AUC and logloss.",
        example="hilomoe data synth --rows 1000000 --out data/synth --seed 0",
    )
    d.add_argument("--rows", type=positive_int, required=True, help="rows to generate (all splits)")
    d.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    d.add_argument("--seed", type=int, default=None, help="generator seed")
    d.add_argument("--config", default=None,
                   help="take the generator settings from this training configuration's data.synth")
    d.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")

    c = _command(
        data_sub, "convert", "cmd_data_convert", config=False,
        help="convert public CTR data (Criteo, Avazu, a table) to a canonical dataset",
        description="Stream the input files twice (vocabularies and statistics, then encoding), "
                    "skipping and counting malformed rows, and write DIR as Parquet shards plus "
                    "dataset.json. Formats: criteo (TSV: label, I1-I13, C1-C26), avazu (CSV with "
                    "header), movielens (ratings.dat users.dat movies.dat), table (CSV / TSV / Parquet described by --field-spec YAML: "
                    "columns: {name: categorical | numeric | label | ignore}).",
        example="hilomoe data convert --format criteo --input train.txt --out data/criteo",
    )
    c.add_argument("--format", required=True, choices=["criteo", "avazu", "movielens", "table"])
    c.add_argument("--input", required=True, nargs="+", metavar="PATH")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--field-spec", metavar="YAML", help="column roles (format table)")
    c.add_argument("--min-count", type=positive_int, default=2,
                   help="values seen fewer times map to the OOV id 0 (default 2)")
    c.add_argument("--hash-buckets", type=int, default=None,
                   help="hash categorical values into this many ids instead of a vocabulary")
    c.add_argument("--max-vocab", type=int, default=None, metavar="N",
                   help="keep each field's N most frequent values, counting in bounded memory "
                        "(default: all values seen --min-count times)")
    c.add_argument("--split", choices=["random", "time"], default="random",
                   help="random 8:1:1 (seeded), or by time where the format has one")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--criteo-ints", choices=["categorical", "numeric"], default="categorical",
                   help="I1-I13 as log-square buckets (categorical) or log1p-standardised")
    c.add_argument("--rating-threshold", type=int, default=4,
                   help="movielens: a click is a rating >= this (default 4)")
    c.add_argument("--drop-neutral", action="store_true",
                   help="movielens: leave out ratings just below the threshold (the usual 3s)")
    c.add_argument("--strict", action="store_true", help="stop at the first malformed row")
    c.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    c.add_argument("--ray", action="store_true",
                   help="spread both passes over the Ray cluster (RAY_ADDRESS, else a local "
                        "Ray); automatic in a Ray job for inputs of several chunks")


def _add_bench(sub) -> None:
    """`hilomoe bench layer | data | convert`, then the training benchmarks."""
    bench_sub = _group(sub, "bench", "speed benchmarks",
                       "Speed benchmarks that print a table (or --json): several paths side by "
                       "side in one process, so their ratios are fair.",
                       "hilomoe bench study --json")
    b = _command(
        bench_sub, "layer", "hilomoe.bench.commands:cmd_layer", config=False,
        help="forward+backward latency of one HiLoMoE projection vs its rivals",
        description="Median forward+backward time of one projection: HiLoMoE at several depths "
                    "against sequential stacking, a flat MoE, dense projections (plain and of "
                    "equal FLOPs) and a full-rank MoE, side by side in one process.",
        example="hilomoe bench layer --json",
    )
    b.add_argument("--batch", type=positive_int, default=4096)
    b.add_argument("--dim", type=positive_int, default=256)
    b.add_argument("--experts", type=positive_int, default=16)
    b.add_argument("--top-k", type=positive_int, default=2)
    b.add_argument("--levels", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    b.add_argument("--repeats", type=positive_int, default=10)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when one is present")
    bd = _command(
        bench_sub, "data", "hilomoe.bench.commands:cmd_data", config=False,
        help="rows/s of the synthetic writer, the Parquet reader and the Ray Data path",
        description="Write a planted dataset to a temporary directory, then read its train "
                    "split into training-ready tensors with pyarrow and through Ray Data, in "
                    "order and shuffled; rows/s of each.",
        example="hilomoe bench data --rows 2000000 --json",
    )
    bd.add_argument("--rows", type=positive_int, default=2_000_000)
    bd.add_argument("--batch", type=positive_int, default=8192)
    bd.add_argument("--skip-ray", action="store_true", help="leave out the Ray Data path")
    bc = _command(
        bench_sub, "convert", "hilomoe.bench.commands:cmd_convert", config=False,
        help="rows/s and peak memory of data convert on a planted Criteo TSV",
        description="Write a planted Criteo-shaped TSV (Zipf ids, --ids-per-field values per "
                    "categorical field), time pyarrow.csv.read_csv on it (the ceiling) and a "
                    "full `hilomoe data convert` in a subprocess: rows/s of both passes and "
                    "the writing, and the conversion's peak resident memory.",
        example="hilomoe bench convert --rows 1000000 --ids-per-field 100000 --json",
    )
    bc.add_argument("--rows", type=positive_int, default=1_000_000)
    bc.add_argument("--ids-per-field", type=positive_int, default=100_000)
    bc.add_argument("--ray", action="store_true", help="convert with --ray")
    _add_bench_runs(bench_sub)


def _add_bench_runs(bench_sub) -> None:
    """`hilomoe bench train | scale | study`: benchmarks that train."""
    bt = _command(
        bench_sub, "train", "hilomoe.bench.commands:cmd_train", config=False,
        help="samples/s of in-memory, Parquet and Ray Train (1 and 2 workers) training",
        description="Train one model on one planted Parquet dataset through the in-process "
                    "engine (tensors in memory: the ceiling; Parquet through pyarrow) and Ray "
                    "Train with 1 and 2 workers, one after the other in this process; samples/s "
                    "of each, per-epoch wall time, and the share of it Ray adds.",
        example="hilomoe bench train --rows 1250000 --json",
    )
    bt.add_argument("--config", default="studies/train_example.yaml",
                    help="the model and stages to train (default: the quickstart example)")
    bt.add_argument("--rows", type=positive_int, default=1_250_000,
                    help="planted rows; 80%% train (default: a 1M-row train epoch)")
    bt.add_argument("--epochs", type=positive_int, default=2,
                    help="epochs per stage (default 2: five epoch-to-epoch intervals)")
    bt.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2],
                    help="Ray Train worker counts to measure")
    bt.add_argument("--device", default="cpu", help="cuda: the in-memory ceiling on the GPU "
                    "and its fraction of peak FLOP/s (no Ray rows)")
    bt.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the config's)")
    bt.add_argument("--readers", nargs="+", choices=["ray_data", "parquet"],
                    default=["ray_data", "parquet"], help="worker data paths to measure")
    bsc = _command(
        bench_sub, "scale", "hilomoe.bench.commands:cmd_scale", config=False,
        help="training and conversion at real vocabularies (20 to 100k ids per field)",
        description="Criteo-shaped planted data (26 categorical + 13 numeric fields) at 20, "
                    "10k and 100k ids per field, trained locally and on Ray Train with 1 and 2 "
                    "workers with each embedding backend (torchrec, torch), one run after the "
                    "other: samples/s per stage, peak RSS and embedding bytes per worker; then "
                    "the converter's rows/s on a Criteo TSV against pyarrow.csv's read.",
        example="hilomoe bench scale --json\n"
                "  hilomoe bench scale --ids 20 100000 --paths local --backends torchrec",
    )
    bsc.add_argument("--ids", type=positive_int, nargs="+", default=[20, 10_000, 100_000],
                     help="ids per categorical field, one dataset each")
    bsc.add_argument("--paths", nargs="+", choices=["local", "ray_1", "ray_2"],
                     default=["local", "ray_1", "ray_2"])
    bsc.add_argument("--backends", nargs="+", choices=["torchrec", "torch"],
                     default=["torchrec", "torch"])
    bsc.add_argument("--train-rows", type=positive_int, default=300_000, help="train rows per dataset")
    bsc.add_argument("--convert-rows", type=int, default=300_000,
                     help="rows of the converter's Criteo TSV (0: skip the converter)")
    bs = _command(
        bench_sub, "study", "hilomoe.bench.commands:cmd_study", config=False,
        help="share of a study's wall time spent outside trial training",
        description="Run a study (default: the quickstart) in a temporary directory with its "
                    "own MLflow store and report the wall time, the trials' training time, and "
                    "the share of the wall time spent outside training (Tune scheduling, trial "
                    "start-up, MLflow logging, checkpoint I/O), plus the stage-1 cache's saving.",
        example="hilomoe bench study --json",
    )
    bs.add_argument("--study", default="studies/quickstart.yaml")
    bs.add_argument("--trials", type=positive_int, default=None, help="override the study's trial budget")


def _add_study(sub) -> None:
    """`hilomoe study run | plan`, then the commands that read a finished study."""
    study_sub = _group(sub, "study", "search experts, ranks and depths with Ray Tune + Optuna",
                       "Run a study file (Ray Tune + Optuna trials, MLflow tracking) and report "
                       "its Pareto frontier and scaling laws.",
                       "hilomoe study run studies/quickstart.yaml")
    sr = _command(
        study_sub, "run", "cmd_study_run", config=False,
        help="run a study file: trials, MLflow runs, and the report",
        description="Run the study's trials with Ray Tune and Optuna (TPE, or MOTPE for two "
                    "objectives) and ASHA early stopping on joint-stage epochs; each trial "
                    "trains the three stages, sharing stage 1 with trials of the same base "
                    "model. Every trial is a child run of the study's MLflow run. Ends with "
                    "the Pareto and scaling report in the study directory.",
        example="hilomoe study run studies/quickstart.yaml\n"
                "  hilomoe study run studies/quickstart.yaml --resume   # after an interruption",
    )
    sr.add_argument("study", help="study file (YAML)")
    sr.add_argument("--out", metavar="DIR", help="study directory (default runs/NAME)")
    sr.add_argument("--resume", action="store_true",
                    help="continue the interrupted study in the study directory")
    _budget_flags(sr)
    sr.add_argument("--no-cache", action="store_true",
                    help="train every trial's stage 1 (no stage-1 sharing)")
    sr.add_argument("--register", metavar="NAME",
                    help="register the best model in MLflow's model registry as NAME")
    pl = _command(
        study_sub, "plan", "cmd_study_plan", config=False,
        help="what a study will cost: wall time and CPU/GPU-hours, before it runs",
        description="Calibrate a few hundred training steps of every stage on the space's "
                    "cheapest and dearest points, then simulate the study's phases (search, "
                    "law designs, repeats) at its concurrency, with stage-1 sharing and ASHA's "
                    "expected cut, over random draws of the space. `study run` prints the same "
                    "plan first and its report sets it against the actual.",
        example="hilomoe study plan studies/quickstart.yaml",
    )
    pl.add_argument("study", help="study file (YAML)")
    pl.add_argument("--steps", type=positive_int, default=200,
                    help="training steps timed per stage and point (default 200)")
    _budget_flags(pl)
    _add_study_answers(study_sub)


def _add_study_answers(study_sub) -> None:
    """`hilomoe study report | recommend`."""
    rp = _command(
        study_sub, "report", "cmd_study_report", config=False,
        help="Pareto (AUC vs FLOPs), ROI and scaling-law report of a study",
        description="Write report.md and PNG plots: the Pareto frontier of validation AUC "
                    "against FLOPs per sample per variant with the ROI against the non-MoE "
                    "baseline, and saturating power-law fits of the AUC gap against "
                    "parameters, FLOPs, K, L and r with confidence intervals and a held-out "
                    "check. Reads a study directory, or an MLflow experiment's latest study "
                    "(then the report is also logged to its parent run).",
        example="hilomoe study report runs/quickstart\n  hilomoe study report quickstart",
    )
    rp.add_argument("target", metavar="STUDY_DIR_OR_MLFLOW_EXPERIMENT")
    rp.add_argument("--out", metavar="DIR", help="where to write the report (default: "
                    "STUDY_DIR/report, or reports/EXPERIMENT)")
    rc = _command(
        study_sub, "recommend", "cmd_study_recommend", config=False,
        help="the configuration a study predicts is best within a FLOPs budget",
        description="From a finished study's fitted scaling laws (its `laws` design axes) and "
                    "its frontier: the configuration predicted to reach the best validation "
                    "AUC within --flops FLOPs per sample, with a 95% interval. --verify trains "
                    "it and prints predicted against achieved; every recommendation is kept in "
                    "the study directory and compared in its report.",
        example="hilomoe study recommend runs/quickstart --flops 20000 --verify",
    )
    rc.add_argument("study_dir", metavar="STUDY_DIR")
    rc.add_argument("--flops", type=positive_float, required=True, help="FLOPs per sample, at most")
    rc.add_argument("--verify", action="store_true", help="train the recommendation")


def _add_cache(sub) -> None:
    """`hilomoe cache ls | prune`."""
    cache_sub = _group(sub, "cache", "list and prune the stage-1 and trial caches",
                       "The stage-1 and trial caches that studies share ($HILOMOE_CACHE, "
                       "default ~/.cache/hilomoe): list their entries, or remove the ones not "
                       "used for a while and the least recently used until the rest fit a size.",
                       "hilomoe cache prune --older-than 30d --max-size 20G")
    for name, handler, help, description, example in (
            ("ls", "cmd_cache_ls", "every cache entry: kind, key, size, age, last use",
             "Every entry of the stage-1 and trial caches, least recently used first: its "
             "kind (stage1 or trial), key, size on disk, age and when a trial last used it.",
             "hilomoe cache ls --json"),
            ("prune", "cmd_cache_prune", "remove old and least recently used cache entries",
             "Remove the entries not used for longer than --older-than, then the least "
             "recently used ones until the rest hold at most --max-size. An entry a trial is "
             "using right now is left alone.",
             "hilomoe cache prune --older-than 30d --max-size 20G")):
        cp = _command(cache_sub, name, handler, config=False, help=help,
                      description=description, example=example)
        cp.add_argument("--dir", metavar="DIR", default=None,
                        help="the cache directory (default: $HILOMOE_CACHE, else "
                             "~/.cache/hilomoe)")
        if name == "prune":
            cp.add_argument("--older-than", metavar="DURATION", default=None, type=duration,
                            help="remove entries not used for longer than this (90m, 12h, 30d, 2w)")
            cp.add_argument("--max-size", metavar="SIZE", default=None, type=size,
                            help="then remove the least recently used until the rest fit "
                                 "(500M, 20G; binary units)")


def _add_ui(sub) -> None:
    """`hilomoe ui`."""
    ui = sub.add_parser(
        "ui", help="open the MLflow UI on the tracking store",
        description="Start the MLflow UI on the store studies log to: MLFLOW_TRACKING_URI, or "
                    "the SQLite file mlflow.db in the working directory.",
        epilog="example:\n  hilomoe ui --port 5000", formatter_class=argparse.RawDescriptionHelpFormatter)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler="cmd_ui")


def _budget_flags(parser: argparse.ArgumentParser) -> None:
    """The study budget's overrides, shared by `study run` and `study plan`."""
    parser.add_argument("--trials", type=positive_int, default=None, help="override budget.trials")
    parser.add_argument("--concurrency", type=positive_int, default=None,
                        help="override budget.concurrency")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help="override budget.cpus_per_trial")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="override budget.gpus_per_trial (a trial with a GPU trains on it)")
