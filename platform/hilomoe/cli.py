"""The `hilomoe` command: parse, validate once, call one function per subcommand.

Every subcommand with `--json` prints exactly one JSON object on stdout; progress and logs go to
stderr. Bad input ends with one sentence on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from hilomoe import __version__, jsonio
from hilomoe.errors import HilomoeError, hilomoe_cause, out_of_memory

out = Console(soft_wrap=True)
log = Console(stderr=True, soft_wrap=True)


def _emit_json(obj: Any) -> None:
    # the real stdout: while a command runs, stray prints (Ray's, libraries') go to stderr
    sys.__stdout__.write(jsonio.dumps(obj) + "\n")
    sys.__stdout__.flush()


def _cell(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.4f}"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c in ("variant", "part", "stage") else "right")
    for r in rows:
        table.add_row(*[_cell(v) for v in r])
    return table


# ----------------------------------------------------------------------------------------------
# model summary


def cmd_model_summary(args: argparse.Namespace) -> int:
    import torch

    from hilomoe.config import EmbeddingConfig, load_config
    from hilomoe.engine.local import schema_for
    from hilomoe.model import CTRModel, RoutingMode, measured_flops, model_cost
    from hilomoe.model.embedding import embedding_bytes

    cfg = load_config(args.config)
    schema = schema_for(cfg)  # the dataset's real vocabularies when data.path is set
    mode = RoutingMode(args.routing)
    batch = args.batch or cfg.eval_batch_size
    workers = args.workers or cfg.ray.workers
    cost = model_cost(schema, cfg.model, mode, batch)
    torch.manual_seed(cfg.seed)
    # FLOPs are counted on the torch backend: the same function, one table, no FBGEMM padding
    model = CTRModel(schema, cfg.model.model_copy(
        update={"embedding": EmbeddingConfig(backend="torch")}))
    model.set_routing(mode)
    cat = torch.stack([torch.randint(0, v, (batch,)) for v in schema.vocab_sizes], dim=1)
    num = torch.randn(batch, schema.numeric)
    measured = measured_flops(model, cat, num)
    backend = cfg.model.embedding.backend
    per_worker = embedding_bytes(schema, cfg.model.embedding_dim, backend, workers,
                                 cfg.stages.base.embedding_optimizer)
    result = {
        **cost.as_dict(),
        "flops_measured": measured,
        "variant": cfg.model.moe.variant.value if cfg.model.moe.has_experts else "dense",
        "routing": mode.value,
        "batch": batch,
        "fields": {"categorical": len(schema.vocab_sizes), "numeric": schema.numeric,
                   "embedding_rows": schema.embedding_rows},
        "embedding": {"backend": backend, "workers": workers,
                      "optimizer": cfg.stages.base.embedding_optimizer,
                      "bytes_per_worker": per_worker},
        "parts": {k: {"params_total": v.params_total, "params_active": int(v.params_active),
                      "flops": v.flops} for k, v in cost.parts.items()},
    }
    if args.json:
        _emit_json(result)
        return 0
    rows = [[k, v.params_total, int(v.params_active), v.flops] for k, v in cost.parts.items()]
    rows.append(["total", cost.params_total, int(cost.params_active), cost.flops])
    out.print(_table(f"{args.config}: {result['variant']} model, {mode.value} routing",
                     ["part", "params", "active params", "FLOPs/sample"], rows))
    out.print(f"{len(schema.vocab_sizes)} categorical fields ({schema.embedding_rows:,} embedding "
              f"rows) + {schema.numeric} numeric; embedding params {cost.params_embedding:,}; "
              f"FLOPs/sample analytic {cost.flops:,.0f}, measured (FlopCounterMode, batch "
              f"{batch}) {measured:,.0f}", highlight=False)
    out.print(f"embedding tables + {result['embedding']['optimizer']} state per worker "
              f"({backend}, {workers} worker(s)): "
              + ", ".join(f"{b / 2**20:,.1f} MiB" for b in per_worker), highlight=False)
    return 0


# ----------------------------------------------------------------------------------------------
# train


def _epoch_line(stage: str, epoch: int, loss: float, valid: dict, improved: bool,
                samples_per_s: float, tail: str = "") -> None:
    mark = "*" if improved else " "
    log.print(f"[{stage:>7}] epoch {epoch + 1:>3}  loss {loss:.4f}  valid auc {valid['auc']:.4f}"
              f"{mark} logloss {valid['logloss']:.4f}  {samples_per_s:,.0f} samples/s{tail}",
              highlight=False, markup=False)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class _RayConsole:
    """Progress of a Ray run: the worker plan, then one line per epoch with elapsed time and an
    upper bound on the time left (early stopping usually ends stages sooner)."""

    def __init__(self, cfg):
        self.stages = cfg.stages
        self.seconds: list[float] = []

    def __call__(self, event: dict) -> None:
        if event["kind"] == "start":
            p = event["plan"]
            log.print(f"Ray Train: {p['workers']} worker(s) x {p['cpus_per_worker']:g} CPU"
                      f"{' + 1 GPU' if p['gpus_per_worker'] else ''}, {p['data_cpus']:g} CPU "
                      f"kept for Ray Data; run directory {event['out_dir']}", highlight=False)
            return
        from hilomoe.config import StageName

        self.seconds.append(event["epoch_seconds"])
        names = [n.value for n in StageName if self.stages.get(n).enabled]
        left = self.stages.get(StageName(event["stage"])).epochs - event["epoch"] - 1
        left += sum(self.stages.get(StageName(n)).epochs for n in names[names.index(event["stage"]) + 1:])
        eta = sum(self.seconds) / len(self.seconds) * left
        _epoch_line(event["stage"], event["epoch"], event["train_loss"], event["valid"],
                    event["improved"], event["samples_per_s"],
                    f"  elapsed {_duration(event['elapsed_s'])}, ETA <= {_duration(eta)}")


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
                 "ray.compile": True if args.compile else None,
                 "ray.max_failures": args.max_failures, "ray.reader": args.reader}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    if not args.local:
        return _train_ray(args, cfg)
    from hilomoe.session import train_local

    result = train_local(cfg, on_epoch=lambda r: _epoch_line(
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
        result = train_ray(run, on_event=_RayConsole(run.cfg))
    except KeyboardInterrupt:
        raise HilomoeError(f"interrupted; continue the run with "
                           f"`hilomoe train --resume {run.out_dir}`") from None
    return _train_report(args, result)


def _train_report(args: argparse.Namespace, result: dict) -> int:
    if args.json:
        _emit_json(result)
        return 0
    rows = [[name, s["epochs"], s["auc"], s["logloss"]] for name, s in result["stages"].items()]
    rows.append(["test", "", result["test"]["auc"], result["test"]["logloss"]])
    if result.get("bayes"):
        rows.append(["bayes (test)", "", result["bayes"]["test"]["auc"],
                     result["bayes"]["test"]["logloss"]])
    out.print(_table(f"{args.config or args.resume}: best validation per stage, then test",
                     ["stage", "epochs", "auc", "logloss"], rows))
    if "out_dir" in result:
        out.print(f"results, final weights and checkpoints: {result['out_dir']}", highlight=False)
    return 0


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
    if args.json:
        _emit_json(result)
        return 0
    rows = [[s, info["rows"], len(info["files"]), result["extra"]["bayes"][s]["auc"]]
            for s, info in result["splits"].items()]
    out.print(_table(f"{args.out}: {result['rows_per_s']:,.0f} rows/s",
                     ["split", "rows", "files", "bayes auc"], rows))
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from hilomoe.data.convert import ConvertOptions, convert

    options = ConvertOptions(min_count=args.min_count, hash_buckets=args.hash_buckets,
                             max_vocab=args.max_vocab, split=args.split, seed=args.seed,
                             strict=args.strict, criteo_ints=args.criteo_ints,
                             overwrite=args.overwrite, rating_threshold=args.rating_threshold,
                             drop_neutral=args.drop_neutral, ray=args.ray)
    log.print(f"converting {len(args.input)} {args.format} file(s) to {args.out} ...")
    result = convert(args.format, args.input, args.out, options, field_spec=args.field_spec)
    if result["rows_skipped"]:
        log.print(f"skipped {result['rows_skipped']:,} malformed row(s); the first:",
                  highlight=False)
        for example in result["skipped_examples"]:
            log.print(f"  {example}", markup=False, highlight=False)
    if args.json:
        _emit_json(result)
        return 0
    rows = [[s, info["rows"], len(info["files"])] for s, info in result["splits"].items()]
    out.print(_table(f"{args.out}: {len(result['fields'])} fields, {result['seconds']:.1f} s",
                     ["split", "rows", "files"], rows))
    return 0


# ----------------------------------------------------------------------------------------------
# bench layer


def cmd_bench_layer(args: argparse.Namespace) -> int:
    import torch

    from hilomoe.bench import layer

    devices = ["cpu"]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append("cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HilomoeError("--device cuda: no CUDA device is available on this machine")
    rows = []
    for dev in devices:
        log.print(f"benchmarking on {dev} ...")
        rows += layer.run(batch=args.batch, dim=args.dim, experts=args.experts, top_k=args.top_k,
                          levels=tuple(args.levels), device=dev, repeats=args.repeats)
    by_device = {dev: [r for r in rows if r.device == dev] for dev in devices}
    if args.json:
        res = layer.as_json(rows)
        res["goals"] = {dev: layer.goals(rs) for dev, rs in by_device.items()}
        res["threads"] = torch.get_num_threads()
        _emit_json(res)
        return 0
    for dev, rs in by_device.items():
        table_rows = [[r.variant, r.levels, r.experts, f"{r.d_in}x{r.d_out}", r.ms,
                       r.flops / 1e9, r.gflops_per_s] for r in rs]
        out.print(_table(f"forward+backward, batch {args.batch}, d {args.dim}, top-{args.top_k}, "
                         f"{dev} ({torch.get_num_threads()} threads)",
                         ["variant", "L", "K", "shape", "ms", "GFLOP", "GFLOP/s"], table_rows))
        g = layer.goals(rs)
        out.print(f"HiLoMoE rate at L={g['levels_max']} vs L=1: {g['hilomoe_rate_Lmax_over_L1']:.0%} "
                  f"(goal >= 85%); vs plain dense: {g['hilomoe_rate_Lmax_over_dense']:.0%} (goal >= 60%); "
                  f"latency L={g['levels_max']}/L=1: hilomoe {g['hilomoe_ms_Lmax_over_L1']:.2f}x, "
                  f"sequential {g['sequential_ms_Lmax_over_L1']:.2f}x")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from hilomoe.bench import data

    log.print(f"benchmarking the data paths on {args.rows:,} rows ...")
    rows = data.run(rows=args.rows, batch=args.batch, ray=not args.skip_ray)
    if args.json:
        _emit_json(data.as_json(rows))
        return 0
    out.print(_table("data paths", ["path", "detail", "rows", "seconds", "rows/s"],
                     [[r.path, r.detail, r.rows, r.seconds, r.rows_per_s] for r in rows]))
    return 0


def cmd_bench_convert(args: argparse.Namespace) -> int:
    from hilomoe.bench import convert

    if args.ids_per_field < 1:
        raise HilomoeError(f"--ids-per-field: must be a positive integer, got {args.ids_per_field}")
    log.print(f"benchmarking data convert on {args.rows:,} planted Criteo rows "
              f"({args.ids_per_field:,} ids per field{', on Ray' if args.ray else ''}) ...")
    res = convert.run(rows=args.rows, ids_per_field=args.ids_per_field, ray=args.ray)
    if args.json:
        _emit_json(res)
        return 0
    ceiling = res["pyarrow_csv_rows_per_s"]
    out.print(_table(f"data convert: {res['rows']:,} rows, {res['input_mb']:,.0f} MB TSV, "
                     f"{res['chunks']} chunk(s)",
                     ["path", "seconds", "rows/s", "vs ceiling", "peak RSS MB"],
                     [["pyarrow_csv (ceiling)", res["pyarrow_csv_seconds"], ceiling, "100%", "-"],
                      ["convert --ray" if res["ray"] else "convert", res["convert_seconds"],
                       res["convert_rows_per_s"], f"{res['convert_rows_per_s'] / ceiling:.0%}",
                       res["convert_peak_rss_mb"]]]))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from hilomoe.bench import train

    log.print(f"benchmarking the training paths on {args.rows:,} planted rows ...")
    rows = train.run(config=args.config, rows=args.rows, epochs=args.epochs,
                     workers=tuple(args.workers), readers=tuple(args.readers),
                     device=args.device, batch=args.batch)
    if args.device != "cpu" and not args.json:
        r = rows[0]
        out.print(f"{r.gpu}: {r.samples_per_s:,.0f} samples/s (batch "
                  f"{args.batch or 'as configured'}, bf16), "
                  f"{(r.gpu_peak_fraction or 0):.2%} of the bf16 peak", highlight=False)
        return 0
    if args.json:
        _emit_json(train.as_json(rows))
        return 0
    out.print(_table(f"training paths ({args.config}, {args.epochs} epoch(s) per stage)",
                     ["mode", "samples", "samples/s", "vs ceiling", "epoch wall s",
                      "Ray overhead", "startup s", "total s"],
                     [[r.mode, r.samples, r.samples_per_s,
                       f"{r.samples_per_s / rows[0].samples_per_s:.0%}", r.epoch_wall_s,
                       "" if r.overhead_fraction is None else f"{r.overhead_fraction:.0%}",
                       r.startup_s, r.total_s] for r in rows]))
    return 0


# ----------------------------------------------------------------------------------------------
# studies


def cmd_study_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.study.console import TrialTable
    from hilomoe.study.driver import run_study
    from hilomoe.study.space import SearchSpace
    from hilomoe.distributed.runtime import runs_dir

    spec = _study_spec(args)
    study_dir = Path(args.out or runs_dir(spec.name))
    console = None if args.json else TrialTable(SearchSpace(spec).labels(), spec.budget.trials)
    if not args.json:
        log.print(f"study {spec.name}: {spec.budget.trials} trials, {spec.budget.concurrency} at "
                  f"a time, objectives {', '.join(f'{o.mode} {o.metric}' for o in spec.objectives)}"
                  f"; results in {study_dir}", highlight=False)
    summary = run_study(spec, study_dir, resume=args.resume, console=console,
                        cache=not args.no_cache, register=args.register)
    if args.json:
        _emit_json(summary)
        return 0
    _print_study(summary)
    return 0


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
    from hilomoe.study.plan import plan_study
    from hilomoe.distributed.runtime import cache_dir, dataset_path

    spec = _study_spec(args)
    plan = plan_study(spec, dataset_path(spec.train), str(cache_dir()), steps=args.steps)
    if args.json:
        _emit_json(plan.as_dict())
        return 0
    out.print(plan.sentence(), highlight=False)
    out.print(_table("phases (mean over the draws)", ["phase", "trials", "trial-seconds",
                                                      "wall s"],
                     [[p.phase, f"{p.trials:.0f}", f"{p.trial_s:.0f}", f"{p.wall_s:.0f}"]
                      for p in plan.phases]))
    cal = plan.calibration
    out.print(_table(f"calibration ({cal.device}, {cal.threads} thread(s))",
                     ["point", "stage", "batch", "FLOPs/sample", "samples/s"],
                     [[m.point, m.stage, m.batch, f"{m.flops:,.0f}", f"{m.samples_per_s:,.0f}"]
                      for m in cal.train]))
    for line in plan.assumptions:
        out.print(f"assumes: {line}", highlight=False)
    return 0


def _print_study(summary: dict) -> None:
    best = summary["best"]
    c = summary["counts"]
    out.print(f"{c['completed']} trials completed, {c['pruned']} pruned, {c['failed']} failed; "
              f"stage 1 reused by {summary['stage1_reused']} (saved "
              f"{_duration(summary['stage1_saved_s'])} of training)", highlight=False)
    if best:
        m = best["metrics"]
        params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        out.print(f"best trial {best['trial_id']}: valid auc {m['valid_auc']:.4f}, test auc "
                  f"{m['test_auc']:.4f}, {m['flops']:,.0f} FLOPs/sample ({params})",
                  highlight=False)
    h = summary.get("headline") or {}
    if "verdict" in h:
        ci = h.get("auc_diff_ci")
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}] (95%)" if ci else ""
        out.print(f"verdict over {h['seeds']} seed(s): {h['verdict']} (hilomoe minus dense, "
                  f"{h['metric']}: {h['auc_diff']:+.4f}{interval})", highlight=False)
    for axis, law in (summary.get("laws") or {}).items():
        mae = law.get("heldout_mae")
        state = ("identified" if law["identified"] else f"not identified ({law['reason']})")
        out.print(f"law along {axis}: {state}"
                  f"{'' if mae is None else f', held-out error {mae:.4f} AUC'}", highlight=False)
    out.print(_table("Pareto set (validation AUC vs FLOPs per sample)",
                     ["variant", "trial", "auc", "FLOPs"],
                     [[p["variant"], p["trial_id"], p["auc"], p["flops"]]
                      for p in summary["pareto"]]))
    local = not summary["tracking_uri"].startswith(("http://", "https://"))
    out.print(f"report: {summary['report']}\nbrowse every trial: "
              f"{'hilomoe ui, then ' if local else ''}{summary['mlflow_url'] or 'MLflow'}   "
              f"(experiment {summary['mlflow_experiment']!r} at {summary['tracking_uri']})",
              highlight=False)


def cmd_study_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.study.plan import saved_cost
    from hilomoe.study.recommend import load_recommendations
    from hilomoe.study.report import write_report
    from hilomoe.study.records import load_records

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
        from hilomoe.config import plain_name_problem
        from hilomoe.study.tracking import load_records as mlflow_records

        problem = None if args.out else plain_name_problem(args.target)
        if problem:  # the report would land at reports/<target>, outside reports/
            raise HilomoeError(f"{args.target}: no such study directory; as an MLflow experiment, "
                               f"{problem}; give --out DIR for its report.")
        records, parent = mlflow_records(args.target)
        title = args.target
        out_dir = Path(args.out or Path("reports") / args.target)
    report = write_report(records, out_dir, title=title,
                          recommendations=load_recommendations(target) if parent is None else None,
                          cost=cost)
    if parent is not None:
        from hilomoe.study.tracking import Tracker

        tracker = Tracker(args.target)
        tracker.start_study({}, run_id=parent)
        tracker.log_study_artifacts(out_dir)
        tracker.finish_study("FINISHED")
    result = {**report.as_dict(), "trials": len(records)}
    if args.json:
        _emit_json(result)
        return 0
    out.print(f"{len(records)} trials; report written to {report.markdown}"
              f"{' and logged to MLflow' if parent else ''}", highlight=False)
    return 0


def cmd_study_recommend(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hilomoe.study.driver import StudyRun
    from hilomoe.study.plan import saved_cost
    from hilomoe.study.recommend import load_recommendations, recommend, save, verify
    from hilomoe.study.records import load_records
    from hilomoe.study.report import write_report

    if not args.flops > 0:
        raise HilomoeError(f"--flops: must be a positive number of FLOPs per sample, got "
                           f"{args.flops:g}")
    run = StudyRun.load(args.study_dir)
    rec = recommend(run, args.flops)
    if args.verify:
        verify(run, rec)
    save(run, rec)
    study_dir = Path(run.study_dir)  # the report gains the recommendation
    write_report(load_records(study_dir), study_dir / "report", title=run.study.name,
                 recommendations=load_recommendations(study_dir), cost=saved_cost(study_dir))
    if args.json:
        _emit_json(rec.as_dict())
        return 0
    ci = "" if rec.interval is None else f" [{rec.interval[0]:.4f}, {rec.interval[1]:.4f}]"
    out.print(f"within {args.flops:,.0f} FLOPs per sample: {rec.source}"
              f"{' (extrapolated past the values tried)' if rec.extrapolated else ''}, "
              f"{rec.flops:,.0f} FLOPs, predicted valid AUC {rec.predicted_auc:.4f}{ci} (95%)",
              highlight=False)
    out.print("settings: " + ", ".join(f"{k}={v}" for k, v in rec.settings.items()),
              highlight=False)
    if rec.achieved is not None:
        inside = rec.within_interval()
        out.print(f"verified: achieved valid AUC {rec.achieved['valid_auc']:.4f} against "
                  f"{rec.predicted_auc:.4f} predicted"
                  f"{'' if inside is None else ' (inside the interval)' if inside else ' (outside the interval)'}",
                  highlight=False)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from hilomoe.study.tracking import study_views, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        out.print(f"MLFLOW_TRACKING_URI is a tracking server: open {uri}", highlight=False)
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


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from hilomoe.bench import scale

    result = scale.run(ids=tuple(args.ids), paths=tuple(args.paths),
                       backends=tuple(args.backends), train_rows=args.train_rows,
                       convert_rows=args.convert_rows,
                       log=lambda m: log.print(m, highlight=False))
    if args.json:
        _emit_json(result)
        return 0
    out.print(_table("training at real vocabularies (samples/s per stage; busiest worker)",
                     ["path", "backend", "ids/field", "stage", "samples/s", "peak RSS MB",
                      "embedding MB"],
                     [[r["path"], r["backend"], r["ids_per_field"], r["stage"],
                       r["samples_per_s"], r["peak_rss_mb"], r["embedding_bytes"] / 2**20]
                      for r in result["rows"]]))
    g = result["goals"]
    for key, ratio in g["torchrec_speed_ratio"].items():
        out.print(f"torchrec {key}: {ratio:.2f}x of its speed at the fewest ids (goal >= 0.7)",
                  highlight=False)
    for key, ratio in g["bytes_ratio_2_over_1"].items():
        out.print(f"{key}: 2 workers hold {ratio:.2f}x of 1 worker's embedding bytes each "
                  f"(goal <= 0.6 for torchrec)", highlight=False)
    if result.get("convert_rows_per_s"):
        out.print(f"convert: {result['convert_rows_per_s']:,.0f} rows/s vs pyarrow.csv read "
                  f"{result['pyarrow_csv_rows_per_s']:,.0f} rows/s; peak RSS "
                  f"{result['convert_peak_rss_mb']:,.0f} MB", highlight=False)
    return 0


def cmd_bench_study(args: argparse.Namespace) -> int:
    from hilomoe.bench import study

    log.print(f"benchmarking the study overhead on {args.study} ...")
    result = study.run(args.study, trials=args.trials)
    if args.json:
        _emit_json(result)
        return 0
    out.print(_table(f"study overhead ({args.study})",
                     ["trials", "wall s", "planned s", "trial training s", "slots",
                      "outside training", "stage-1 reused", "stage-1 saved s"],
                     [[result["trials"], result["wall_s"], result["planned_wall_s"],
                       result["train_s"], result["slots"],
                       f"{result['overhead_fraction']:.0%}", result["stage1_reused"],
                       result["stage1_saved_s"]]]))
    return 0


# ----------------------------------------------------------------------------------------------
# cache


def _cache_root(args: argparse.Namespace):
    from pathlib import Path

    from hilomoe.distributed.runtime import cache_dir

    return Path(args.dir) if args.dir else cache_dir()


def _bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _cache_rows(entries, now: float) -> list[dict]:
    return [{"kind": e.kind, "key": e.key, "path": e.path, "bytes": e.bytes,
             "age_s": now - e.created, "last_used_s": now - e.used} for e in entries]


def _print_entries(title: str, rows: list[dict]) -> None:
    out.print(_table(title, ["kind", "key", "size", "age", "last used"],
                     [[r["kind"], r["key"], _bytes(r["bytes"]), _ago(r["age_s"]),
                       _ago(r["last_used_s"]) + " ago"] for r in rows]))


def cmd_cache_ls(args: argparse.Namespace) -> int:
    import time

    from hilomoe.study.cache import cache_entries

    root, now = _cache_root(args), time.time()
    rows = _cache_rows(cache_entries(root), now)
    total = sum(r["bytes"] for r in rows)
    if args.json:
        _emit_json({"cache_dir": str(root), "entries": rows, "bytes": total})
        return 0
    _print_entries(f"{root}: {len(rows)} entries, {_bytes(total)}", rows)
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    import time

    if args.older_than is None and args.max_size is None:
        raise HilomoeError("cache prune: give --older-than DURATION and/or --max-size SIZE "
                           "(e.g. --older-than 30d --max-size 20G).")
    from hilomoe.study.cache import cache_entries, parse_duration, parse_size, prune_cache

    older = parse_duration(args.older_than) if args.older_than is not None else None
    cap = parse_size(args.max_size) if args.max_size is not None else None
    root, now = _cache_root(args), time.time()
    removed = _cache_rows(prune_cache(root, older, cap, now), now)
    kept = sum(e.bytes for e in cache_entries(root))
    freed = sum(r["bytes"] for r in removed)
    if args.json:
        _emit_json({"cache_dir": str(root), "removed": removed, "freed_bytes": freed,
                    "bytes": kept})
        return 0
    _print_entries(f"{root}: removed {len(removed)} entries ({_bytes(freed)}); "
                   f"{_bytes(kept)} kept", removed)
    return 0


# ----------------------------------------------------------------------------------------------
# parser


def _command(group, name: str, func: Callable, help: str, description: str, example: str,
             config: bool = True) -> argparse.ArgumentParser:
    """A subcommand with its description, an example, and the flags every command shares."""
    p = group.add_parser(name, help=help, description=description,
                         epilog=f"example:\n  {example}",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("config", help="training configuration (YAML)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=func)
    return p


def _group(sub, name: str, help: str, description: str, example: str):
    """A command that only groups subcommands (`hilomoe model ...`)."""
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(
        dest=f"{name}_command", metavar="COMMAND", required=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hilomoe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and study HiLoMoE (Hierarchical LoRA MoE) CTR models.",
        epilog="example:\n  hilomoe study run studies/quickstart.yaml\n"
               "  hilomoe ui\n"
               "  hilomoe train studies/train_example.yaml --local",
    )
    p.add_argument("--version", action="version", version=f"hilomoe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model_sub = _group(sub, "model", "inspect a model configuration",
                       "Inspect the model a training configuration describes.",
                       "hilomoe model summary studies/train_example.yaml")
    s = _command(
        model_sub, "summary", cmd_model_summary,
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
    s.add_argument("--batch", type=int, default=None, help="batch size (default: eval_batch_size)")
    s.add_argument("--workers", type=int, default=None,
                   help="report embedding bytes per worker for this many Ray Train workers "
                        "(default: ray.workers)")

    t = _command(
        sub, "train", cmd_train, config=False, help="train through the three stages",
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
    t.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks)")
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
    t.add_argument("--max-failures", type=int, default=None,
                   help="worker-group restarts before the run fails")

    data_sub = _group(sub, "data", "create and convert datasets",
                      "Write the planted synthetic problem, or convert public CTR data, into "
                      "the canonical dataset format (Parquet shards + dataset.json).",
                      "hilomoe data convert --format criteo --input train.txt --out data/criteo")
    d = _command(
        data_sub, "synth", cmd_data_synth, config=False,
        help="write the planted synthetic problem as a canonical dataset",
        description="Stream planted rows (Zipf ids, a tree of latent segments, known click "
                    "probabilities) into DIR as Parquet shards plus dataset.json, which records "
                    "each split's Bayes-optimal AUC and logloss.",
        example="hilomoe data synth --rows 1000000 --out data/synth --seed 0",
    )
    d.add_argument("--rows", type=int, required=True, help="rows to generate (all splits)")
    d.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    d.add_argument("--seed", type=int, default=None, help="generator seed")
    d.add_argument("--config", default=None,
                   help="take the generator settings from this training configuration's data.synth")
    d.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")

    c = _command(
        data_sub, "convert", cmd_data_convert, config=False,
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
    c.add_argument("--min-count", type=int, default=2,
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

    bench_sub = _group(sub, "bench", "speed benchmarks",
                       "Speed benchmarks that print a table (or --json): several paths side by "
                       "side in one process, so their ratios are fair.",
                       "hilomoe bench study --json")
    b = _command(
        bench_sub, "layer", cmd_bench_layer, config=False,
        help="forward+backward latency of one HiLoMoE projection vs its rivals",
        description="Median forward+backward time of one projection: HiLoMoE at several depths "
                    "against sequential stacking, a flat MoE, dense projections (plain and of "
                    "equal FLOPs) and a full-rank MoE, side by side in one process.",
        example="hilomoe bench layer --json",
    )
    b.add_argument("--batch", type=int, default=4096)
    b.add_argument("--dim", type=int, default=256)
    b.add_argument("--experts", type=int, default=16)
    b.add_argument("--top-k", type=int, default=2)
    b.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when one is present")
    bd = _command(
        bench_sub, "data", cmd_bench_data, config=False,
        help="rows/s of the synthetic writer, the Parquet reader and the Ray Data path",
        description="Write a planted dataset to a temporary directory, then read its train "
                    "split into training-ready tensors with pyarrow and through Ray Data, in "
                    "order and shuffled; rows/s of each.",
        example="hilomoe bench data --rows 2000000 --json",
    )
    bd.add_argument("--rows", type=int, default=2_000_000)
    bd.add_argument("--batch", type=int, default=8192)
    bd.add_argument("--skip-ray", action="store_true", help="leave out the Ray Data path")
    bc = _command(
        bench_sub, "convert", cmd_bench_convert, config=False,
        help="rows/s and peak memory of data convert on a planted Criteo TSV",
        description="Write a planted Criteo-shaped TSV (Zipf ids, --ids-per-field values per "
                    "categorical field), time pyarrow.csv.read_csv on it (the ceiling) and a "
                    "full `hilomoe data convert` in a subprocess: rows/s of both passes and "
                    "the writing, and the conversion's peak resident memory.",
        example="hilomoe bench convert --rows 1000000 --ids-per-field 100000 --json",
    )
    bc.add_argument("--rows", type=int, default=1_000_000)
    bc.add_argument("--ids-per-field", type=int, default=100_000)
    bc.add_argument("--ray", action="store_true", help="convert with --ray")
    bt = _command(
        bench_sub, "train", cmd_bench_train, config=False,
        help="samples/s of in-memory, Parquet and Ray Train (1 and 2 workers) training",
        description="Train one model on one planted Parquet dataset through the in-process "
                    "engine (tensors in memory: the ceiling; Parquet through pyarrow) and Ray "
                    "Train with 1 and 2 workers, one after the other in this process; samples/s "
                    "of each, per-epoch wall time, and the share of it Ray adds.",
        example="hilomoe bench train --rows 1250000 --json",
    )
    bt.add_argument("--config", default="studies/train_example.yaml",
                    help="the model and stages to train (default: the quickstart example)")
    bt.add_argument("--rows", type=int, default=1_250_000,
                    help="planted rows; 80%% train (default: a 1M-row train epoch)")
    bt.add_argument("--epochs", type=int, default=2,
                    help="epochs per stage (default 2: five epoch-to-epoch intervals)")
    bt.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="Ray Train worker counts to measure")
    bt.add_argument("--device", default="cpu", help="cuda: the in-memory ceiling on the GPU "
                    "and its fraction of peak FLOP/s (no Ray rows)")
    bt.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    bt.add_argument("--readers", nargs="+", choices=["ray_data", "parquet"],
                    default=["ray_data", "parquet"], help="worker data paths to measure")
    bsc = _command(
        bench_sub, "scale", cmd_bench_scale, config=False,
        help="training and conversion at real vocabularies (20 to 100k ids per field)",
        description="Criteo-shaped planted data (26 categorical + 13 numeric fields) at 20, "
                    "10k and 100k ids per field, trained locally and on Ray Train with 1 and 2 "
                    "workers with each embedding backend (torchrec, torch), one run after the "
                    "other: samples/s per stage, peak RSS and embedding bytes per worker; then "
                    "the converter's rows/s on a Criteo TSV against pyarrow.csv's read.",
        example="hilomoe bench scale --json\n"
                "  hilomoe bench scale --ids 20 100000 --paths local --backends torchrec",
    )
    bsc.add_argument("--ids", type=int, nargs="+", default=[20, 10_000, 100_000],
                     help="ids per categorical field, one dataset each")
    bsc.add_argument("--paths", nargs="+", choices=["local", "ray_1", "ray_2"],
                     default=["local", "ray_1", "ray_2"])
    bsc.add_argument("--backends", nargs="+", choices=["torchrec", "torch"],
                     default=["torchrec", "torch"])
    bsc.add_argument("--train-rows", type=int, default=300_000, help="train rows per dataset")
    bsc.add_argument("--convert-rows", type=int, default=300_000,
                     help="rows of the converter's Criteo TSV (0: skip the converter)")
    bs = _command(
        bench_sub, "study", cmd_bench_study, config=False,
        help="share of a study's wall time spent outside trial training",
        description="Run a study (default: the quickstart) in a temporary directory with its "
                    "own MLflow store and report the wall time, the trials' training time, and "
                    "the share of the wall time spent outside training (Tune scheduling, trial "
                    "start-up, MLflow logging, checkpoint I/O), plus the stage-1 cache's saving.",
        example="hilomoe bench study --json",
    )
    bs.add_argument("--study", default="studies/quickstart.yaml")
    bs.add_argument("--trials", type=int, default=None, help="override the study's trial budget")

    study_sub = _group(sub, "study", "search experts, ranks and depths with Ray Tune + Optuna",
                       "Run a study file (Ray Tune + Optuna trials, MLflow tracking) and report "
                       "its Pareto frontier and scaling laws.",
                       "hilomoe study run studies/quickstart.yaml")
    sr = _command(
        study_sub, "run", cmd_study_run, config=False,
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
        study_sub, "plan", cmd_study_plan, config=False,
        help="what a study will cost: wall time and CPU/GPU-hours, before it runs",
        description="Calibrate a few hundred training steps of every stage on the space's "
                    "cheapest and dearest points, then simulate the study's phases (search, "
                    "law designs, repeats) at its concurrency, with stage-1 sharing and ASHA's "
                    "expected cut, over random draws of the space. `study run` prints the same "
                    "plan first and its report sets it against the actual.",
        example="hilomoe study plan studies/quickstart.yaml",
    )
    pl.add_argument("study", help="study file (YAML)")
    pl.add_argument("--steps", type=int, default=200,
                    help="training steps timed per stage and point (default 200)")
    _budget_flags(pl)
    rp = _command(
        study_sub, "report", cmd_study_report, config=False,
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
        study_sub, "recommend", cmd_study_recommend, config=False,
        help="the configuration a study predicts is best within a FLOPs budget",
        description="From a finished study's fitted scaling laws (its `laws` design axes) and "
                    "its frontier: the configuration predicted to reach the best validation "
                    "AUC within --flops FLOPs per sample, with a 95% interval. --verify trains "
                    "it and prints predicted against achieved; every recommendation is kept in "
                    "the study directory and compared in its report.",
        example="hilomoe study recommend runs/quickstart --flops 20000 --verify",
    )
    rc.add_argument("study_dir", metavar="STUDY_DIR")
    rc.add_argument("--flops", type=float, required=True, help="FLOPs per sample, at most")
    rc.add_argument("--verify", action="store_true", help="train the recommendation")
    cache_sub = _group(sub, "cache", "list and prune the stage-1 and trial caches",
                       "The stage-1 and trial caches that studies share ($HILOMOE_CACHE, "
                       "default ~/.cache/hilomoe): list their entries, or remove the ones not "
                       "used for a while and the least recently used until the rest fit a size.",
                       "hilomoe cache prune --older-than 30d --max-size 20G")
    for name, func, help, description, example in (
            ("ls", cmd_cache_ls, "every cache entry: kind, key, size, age, last use",
             "Every entry of the stage-1 and trial caches, least recently used first: its "
             "kind (stage1 or trial), key, size on disk, age and when a trial last used it.",
             "hilomoe cache ls --json"),
            ("prune", cmd_cache_prune, "remove old and least recently used cache entries",
             "Remove the entries not used for longer than --older-than, then the least "
             "recently used ones until the rest hold at most --max-size. An entry a trial is "
             "using right now is left alone.",
             "hilomoe cache prune --older-than 30d --max-size 20G")):
        cp = _command(cache_sub, name, func, config=False, help=help,
                      description=description, example=example)
        cp.add_argument("--dir", metavar="DIR", default=None,
                        help="the cache directory (default: $HILOMOE_CACHE, else "
                             "~/.cache/hilomoe)")
        if name == "prune":
            cp.add_argument("--older-than", metavar="DURATION", default=None,
                            help="remove entries not used for longer than this (90m, 12h, 30d, 2w)")
            cp.add_argument("--max-size", metavar="SIZE", default=None,
                            help="then remove the least recently used until the rest fit "
                                 "(500M, 20G; binary units)")
    ui = sub.add_parser(
        "ui", help="open the MLflow UI on the tracking store",
        description="Start the MLflow UI on the store studies log to: MLFLOW_TRACKING_URI, or "
                    "the SQLite file mlflow.db in the working directory.",
        epilog="example:\n  hilomoe ui --port 5000", formatter_class=argparse.RawDescriptionHelpFormatter)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def _budget_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=None, help="override budget.trials")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="override budget.concurrency")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help="override budget.cpus_per_trial")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="override budget.gpus_per_trial (a trial with a GPU trains on it)")


def _check_positive(args: argparse.Namespace) -> None:
    for key in ("batch", "dim", "experts", "top_k", "repeats", "rows", "min_count", "epochs",
                "workers", "trials", "concurrency", "ids", "train_rows", "steps"):
        value = getattr(args, key, None)
        if any(v < 1 for v in (value if isinstance(value, list) else [value]) if v is not None):
            raise HilomoeError(f"--{key.replace('_', '-')}: must be a positive integer, got {value}")
    if (getattr(args, "max_failures", None) or 0) < 0:
        raise HilomoeError(f"--max-failures: must be zero or more, got {args.max_failures}")
    levels = getattr(args, "levels", None)
    if levels is not None and any(L < 1 for L in levels):
        raise HilomoeError(f"--levels: every level count must be at least 1, got {levels}")
    if getattr(args, "top_k", None) and getattr(args, "experts", None) and args.top_k > args.experts:
        raise HilomoeError(f"--top-k ({args.top_k}) must be at most --experts ({args.experts})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        _check_positive(args)
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
