"""The `hilomoe` command: parse, validate once, call one function per subcommand.

Every subcommand with `--json` prints exactly one JSON object on stdout; progress and logs go to
stderr. Bad input ends with one sentence on stderr and exit status 2, never a stack trace.

The parser and its value checks are in `cli_parser` and `argtypes`; what a command prints for a
person is in `console` (and `study/console.py`, `bench/console.py`). A handler here turns the
parsed flags into one library call and hands its result to `--json` or to its renderer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import Callable

from hilomoe import console
from hilomoe.cli_parser import build_parser
from hilomoe.console import finish, log
from hilomoe.errors import HilomoeError, hilomoe_cause, out_of_memory

__all__ = ["build_parser", "main"]


# ----------------------------------------------------------------------------------------------
# model summary


def cmd_model_summary(args: argparse.Namespace) -> int:
    from hilomoe.config import load_config
    from hilomoe.engine.local import schema_for
    from hilomoe.model import RoutingMode
    from hilomoe.model.summary import model_summary

    cfg = load_config(args.config)
    schema = schema_for(cfg)  # the dataset's real vocabularies when data.path is set
    summary = model_summary(cfg, schema, RoutingMode(args.routing),
                            batch=args.batch or cfg.eval_batch_size,
                            workers=args.workers or cfg.ray.workers)
    return finish(args.json, summary, lambda: console.print_model_summary(args.config, summary))


# ----------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from hilomoe.config import load_config

    if args.resume:
        if args.config or args.local:
            raise HilomoeError("--resume continues a run with its saved configuration: "
                               "give no CONFIG and no --local")
        return _train_ray(args, None)
    if not args.config:
        raise HilomoeError("give a training configuration (CONFIG.yaml), or --resume DIR")
    cfg = load_config(args.config)
    overrides = {"data.path": args.data, "ray.workers": args.workers,
                 "ray.gpu": True if args.gpu else None, "ray.storage": args.storage,
                 "runtime.compile": True if args.compile else None,
                 "ray.max_failures": args.max_failures, "ray.reader": args.reader}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    if not args.local:
        return _train_ray(args, cfg)
    from hilomoe.session import train_local

    result = train_local(cfg, on_epoch=lambda r: console.epoch_line(
        r.stage, r.epoch, r.train["loss"], r.valid, r.improved, r.samples_per_s))
    return _train_report(args, result)


def _train_ray(args: argparse.Namespace, cfg) -> int:
    import time
    from pathlib import Path

    from hilomoe.distributed.driver import TrainRun, train_ray
    from hilomoe.distributed.runtime import runs_dir

    if cfg is None:
        run = TrainRun.load(args.resume)
        log.print(f"resuming {run.out_dir} from its last checkpoint", highlight=False)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = args.out or str(runs_dir(f"{Path(args.config).stem}-{stamp}"))
        run = TrainRun.create(cfg, out)
    try:
        result = train_ray(run, on_event=console.RayConsole(run.cfg))
    except KeyboardInterrupt:
        raise HilomoeError(f"interrupted; continue the run with "
                           f"`hilomoe train --resume {run.out_dir}`") from None
    return _train_report(args, result)


def _train_report(args: argparse.Namespace, result: dict) -> int:
    return finish(args.json, result,
                  lambda: console.print_train(args.config or args.resume, result))


# ----------------------------------------------------------------------------------------------
# data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from hilomoe.config import PlantedData, load_config, parse_config
    from hilomoe.data.synth import write_synth

    spec = load_config(args.config).data.synth if args.config else PlantedData()
    overrides = {"rows": args.rows, **({"seed": args.seed} if args.seed is not None else {})}
    spec = parse_config({**spec.model_dump(), **overrides}, "data synth", PlantedData)
    log.print(f"writing {args.rows:,} planted rows to {args.out} ...")
    result = write_synth(spec, args.out, overwrite=args.overwrite)
    result["rows_skipped"] = 0
    return finish(args.json, result, lambda: console.print_synth(args.out, result))


def cmd_data_convert(args: argparse.Namespace) -> int:
    from hilomoe.data.convert import ConvertOptions, convert

    options = ConvertOptions(min_count=args.min_count, hash_buckets=args.hash_buckets,
                             max_vocab=args.max_vocab, split=args.split, seed=args.seed,
                             strict=args.strict, criteo_ints=args.criteo_ints,
                             overwrite=args.overwrite, rating_threshold=args.rating_threshold,
                             drop_neutral=args.drop_neutral, ray=args.ray)
    log.print(f"converting {len(args.input)} {args.format} file(s) to {args.out} ...")
    result = convert(args.format, args.input, args.out, options, field_spec=args.field_spec)
    console.print_skipped(result)
    return finish(args.json, result, lambda: console.print_convert(args.out, result))


# ----------------------------------------------------------------------------------------------
# studies


def cmd_study_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.study.console import TrialTable, print_study
    from hilomoe.study.driver import run_study
    from hilomoe.study.space import SearchSpace
    from hilomoe.distributed.runtime import runs_dir

    spec = _study_spec(args)
    study_dir = Path(args.out or runs_dir(spec.name))
    table = None if args.json else TrialTable(SearchSpace(spec).labels(), spec.budget.trials)
    if not args.json:
        log.print(f"study {spec.name}: {spec.budget.trials} trials, {spec.budget.concurrency} at "
                  f"a time, objectives {', '.join(f'{o.mode} {o.metric}' for o in spec.objectives)}"
                  f"; results in {study_dir}", highlight=False)
    summary = run_study(spec, study_dir, resume=args.resume, console=table,
                        cache=not args.no_cache, register=args.register)
    return finish(args.json, summary, lambda: print_study(summary))


def _study_spec(args: argparse.Namespace):
    """The study file, with the budget overrides of the command line."""
    from hilomoe.study.spec import load_study, parse_study

    spec = load_study(args.study)
    budget = {"trials": args.trials, "concurrency": args.concurrency,
              "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial}
    budget = {k: v for k, v in budget.items() if v is not None}
    if budget:
        raw = spec.model_dump(mode="json")
        raw["budget"].update(budget)
        spec = parse_study(raw, "command line")
    return spec


def cmd_study_plan(args: argparse.Namespace) -> int:
    from hilomoe.study.console import print_plan
    from hilomoe.study.plan import plan_study
    from hilomoe.distributed.runtime import cache_dir, dataset_path

    spec = _study_spec(args)
    plan = plan_study(spec, dataset_path(spec.train), str(cache_dir()), steps=args.steps)
    return finish(args.json, plan.as_dict() if args.json else None, lambda: print_plan(plan))


def cmd_study_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.report.writer import write_report
    from hilomoe.study.recommend import load_recommendations
    from hilomoe.tracking.records import load_records, saved_cost

    target = Path(args.target)
    parent, cost = None, None
    if (target / "study.json").is_file() or (target / "trials").is_dir():
        records, title = load_records(target), target.name
        out_dir = Path(args.out or target / "report")
        cost = saved_cost(target)
    elif target.exists():
        raise HilomoeError(f"{target}: not a study directory (no study.json); give the --out "
                           f"directory of `hilomoe study run`, or an MLflow experiment name.")
    else:
        records, parent, out_dir = _mlflow_study(args)
        title = args.target
    report = write_report(records, out_dir, title=title,
                          recommendations=load_recommendations(target) if parent is None else None,
                          cost=cost)
    if parent is not None:
        from hilomoe.tracking.runs import Tracker

        tracker = Tracker(args.target)
        tracker.start_study({}, run_id=parent)
        tracker.log_study_artifacts(out_dir)
        tracker.finish_study("FINISHED")
    result = {**report.as_dict(), "trials": len(records)}
    return finish(args.json, result, lambda: console.say(
        f"{len(records)} trials; report written to {report.markdown}"
        f"{' and logged to MLflow' if parent else ''}"))


def _mlflow_study(args: argparse.Namespace):
    """`study report EXPERIMENT`: the experiment's latest study's records, its parent run, and
    where its report goes."""
    from pathlib import Path

    from hilomoe.config import plain_name_problem
    from hilomoe.tracking.read import load_records as mlflow_records

    problem = None if args.out else plain_name_problem(args.target)
    if problem:  # the report would land at reports/<target>, outside reports/
        raise HilomoeError(f"{args.target}: no such study directory; as an MLflow experiment, "
                           f"{problem}; give --out DIR for its report.")
    records, parent = mlflow_records(args.target)
    return records, parent, Path(args.out or Path("reports") / args.target)


def cmd_study_recommend(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.study.console import print_recommendation
    from hilomoe.study.driver import StudyRun
    from hilomoe.report.writer import write_report
    from hilomoe.study.recommend import load_recommendations, recommend, save, verify
    from hilomoe.tracking.records import load_records, saved_cost

    run = StudyRun.load(args.study_dir)
    rec = recommend(run, args.flops)
    if args.verify:
        verify(run, rec)
    save(run, rec)
    study_dir = Path(run.study_dir)  # the report gains the recommendation
    write_report(load_records(study_dir), study_dir / "report", title=run.study.name,
                 recommendations=load_recommendations(study_dir), cost=saved_cost(study_dir))
    return finish(args.json, rec.as_dict() if args.json else None,
                  lambda: print_recommendation(rec, args.flops))


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from hilomoe.tracking.read import study_views
    from hilomoe.tracking.retry import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        console.say(f"MLFLOW_TRACKING_URI is a tracking server: open {uri}")
        return 0
    base = f"http://{args.host}:{args.port}"
    log.print(f"MLflow UI on {base} for {uri} (Ctrl-C stops it)", highlight=False)
    for name, url in study_views(uri, base):  # each study's trials, compared at a glance
        log.print(f"  study {name}: {url}", highlight=False)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
           args.host, "--port", str(args.port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------------------------------------
# cache


def _cache_root(args: argparse.Namespace):
    from pathlib import Path

    from hilomoe.distributed.runtime import cache_dir

    return Path(args.dir) if args.dir else cache_dir()


def cmd_cache_ls(args: argparse.Namespace) -> int:
    import time

    from hilomoe.study.cache import cache_entries

    root, now = _cache_root(args), time.time()
    rows = console.cache_rows(cache_entries(root), now)
    total = sum(r["bytes"] for r in rows)
    return finish(args.json, {"cache_dir": str(root), "entries": rows, "bytes": total},
                  lambda: console.print_cache_entries(
                      f"{root}: {len(rows)} entries, {console.size(total)}", rows))


def cmd_cache_prune(args: argparse.Namespace) -> int:
    import time

    if args.older_than is None and args.max_size is None:
        raise HilomoeError("cache prune: give --older-than DURATION and/or --max-size SIZE "
                           "(e.g. --older-than 30d --max-size 20G).")
    from hilomoe.study.cache import cache_entries, prune_cache

    root, now = _cache_root(args), time.time()  # older_than: seconds; max_size: bytes
    removed = console.cache_rows(prune_cache(root, args.older_than, args.max_size, now), now)
    kept = sum(e.bytes for e in cache_entries(root))
    freed = sum(r["bytes"] for r in removed)
    return finish(args.json, {"cache_dir": str(root), "removed": removed, "freed_bytes": freed,
                              "bytes": kept},
                  lambda: console.print_cache_entries(
                      f"{root}: removed {len(removed)} entries ({console.size(freed)}); "
                      f"{console.size(kept)} kept", removed))


# ----------------------------------------------------------------------------------------------
# dispatch


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The function a subcommand names: `cmd_train` here, or `module:function` elsewhere."""
    module, _, func = name.rpartition(":")
    return getattr(importlib.import_module(module) if module else sys.modules[__name__], func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags and values exit here, status 2
    handler = _handler(args.handler)
    try:
        if getattr(args, "json", False):  # stdout carries exactly one JSON object
            with contextlib.redirect_stdout(sys.stderr):
                return handler(args)
        return handler(args)
    except HilomoeError as err:
        log.print(f"hilomoe: error: {hilomoe_cause(err) or err}", markup=False, highlight=False)
        return 2
    except (RuntimeError, MemoryError) as err:
        message = str(hilomoe_cause(err) or "") or out_of_memory(err)
        if message is None:
            raise
        log.print(f"hilomoe: error: {message}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        log.print("hilomoe: interrupted", markup=False)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
