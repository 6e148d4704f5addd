"""`hilomoe bench ...`: each command's handler (parsed flags -> one benchmark run) and the
table it prints for a person (`--json` prints the benchmark's dict instead).

The flags are declared in `hilomoe.cli_parser`; `hilomoe.cli` dispatches here.
"""

from __future__ import annotations

import argparse

from hilomoe.console import emit_json, finish, log, out, print_table, say
from hilomoe.errors import HilomoeError


def cmd_layer(args: argparse.Namespace) -> int:
    import torch

    from hilomoe.bench import layer

    if args.top_k > args.experts:
        raise HilomoeError(f"--top-k ({args.top_k}) must be at most --experts ({args.experts})")
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
        emit_json(res)
        return 0
    for dev, rs in by_device.items():
        print_layer(rs, layer.goals(rs), args.batch, args.dim, args.top_k, dev,
                    torch.get_num_threads())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from hilomoe.bench import data

    log.print(f"benchmarking the data paths on {args.rows:,} rows ...")
    rows = data.run(rows=args.rows, batch=args.batch, ray=not args.skip_ray)
    return finish(args.json, data.as_json(rows), lambda: print_data(rows))


def cmd_convert(args: argparse.Namespace) -> int:
    from hilomoe.bench import convert

    log.print(f"benchmarking data convert on {args.rows:,} planted Criteo rows "
              f"({args.ids_per_field:,} ids per field{', on Ray' if args.ray else ''}) ...")
    res = convert.run(rows=args.rows, ids_per_field=args.ids_per_field, ray=args.ray)
    return finish(args.json, res, lambda: print_convert(res))


def cmd_train(args: argparse.Namespace) -> int:
    from hilomoe.bench import train

    log.print(f"benchmarking the training paths on {args.rows:,} planted rows ...")
    rows = train.run(config=args.config, rows=args.rows, epochs=args.epochs,
                     workers=tuple(args.workers), readers=tuple(args.readers),
                     device=args.device, batch=args.batch)
    if args.device != "cpu" and not args.json:  # the in-memory ceiling on the GPU only
        print_gpu_train(rows[0], args.batch)
        return 0
    return finish(args.json, train.as_json(rows) if args.json else None,
                  lambda: print_train(rows, args.config, args.epochs))


def cmd_scale(args: argparse.Namespace) -> int:
    from hilomoe.bench import scale

    result = scale.run(ids=tuple(args.ids), paths=tuple(args.paths),
                       backends=tuple(args.backends), train_rows=args.train_rows,
                       convert_rows=args.convert_rows,
                       log=lambda m: log.print(m, highlight=False))
    return finish(args.json, result, lambda: print_scale(result))


def cmd_study(args: argparse.Namespace) -> int:
    from hilomoe.bench import study

    log.print(f"benchmarking the study overhead on {args.study} ...")
    result = study.run(args.study, trials=args.trials)
    return finish(args.json, result, lambda: print_study(result, args.study))


# -- tables -----------------------------------------------------------------------------------


def print_layer(rows: list, goals: dict, batch: int, dim: int, top_k: int, dev: str,
                threads: int) -> None:
    """One device's rows of `bench.layer.run`, then its goals (`bench.layer.goals`)."""
    print_table(f"forward+backward, batch {batch}, d {dim}, top-{top_k}, {dev} ({threads} threads)",
                ["variant", "L", "K", "shape", "ms", "GFLOP", "GFLOP/s"],
                [[r.variant, r.levels, r.experts, f"{r.d_in}x{r.d_out}", r.ms, r.flops / 1e9,
                  r.gflops_per_s] for r in rows])
    g = goals  # printed as before: rich highlights the numbers
    out.print(f"HiLoMoE rate at L={g['levels_max']} vs L=1: {g['hilomoe_rate_Lmax_over_L1']:.0%} "
              f"(goal >= 85%); vs plain dense: {g['hilomoe_rate_Lmax_over_dense']:.0%} (goal >= 60%); "
              f"latency L={g['levels_max']}/L=1: hilomoe {g['hilomoe_ms_Lmax_over_L1']:.2f}x, "
              f"sequential {g['sequential_ms_Lmax_over_L1']:.2f}x")


def print_data(rows: list) -> None:
    print_table("data paths", ["path", "detail", "rows", "seconds", "rows/s"],
                [[r.path, r.detail, r.rows, r.seconds, r.rows_per_s] for r in rows])


def print_convert(res: dict) -> None:
    ceiling = res["pyarrow_csv_rows_per_s"]
    print_table(f"data convert: {res['rows']:,} rows, {res['input_mb']:,.0f} MB TSV, "
                f"{res['chunks']} chunk(s)",
                ["path", "seconds", "rows/s", "vs ceiling", "peak RSS MB"],
                [["pyarrow_csv (ceiling)", res["pyarrow_csv_seconds"], ceiling, "100%", "-"],
                 ["convert --ray" if res["ray"] else "convert", res["convert_seconds"],
                  res["convert_rows_per_s"], f"{res['convert_rows_per_s'] / ceiling:.0%}",
                  res["convert_peak_rss_mb"]]])


def print_gpu_train(row, batch: int | None) -> None:
    """The in-memory ceiling on a GPU: samples/s and the share of the bf16 peak."""
    say(f"{row.gpu}: {row.samples_per_s:,.0f} samples/s (batch {batch or 'as configured'}, "
        f"bf16), {(row.gpu_peak_fraction or 0):.2%} of the bf16 peak")


def print_train(rows: list, config: str, epochs: int) -> None:
    print_table(f"training paths ({config}, {epochs} epoch(s) per stage)",
                ["mode", "samples", "samples/s", "vs ceiling", "epoch wall s",
                 "Ray overhead", "startup s", "total s"],
                [[r.mode, r.samples, r.samples_per_s,
                  f"{r.samples_per_s / rows[0].samples_per_s:.0%}", r.epoch_wall_s,
                  "" if r.overhead_fraction is None else f"{r.overhead_fraction:.0%}",
                  r.startup_s, r.total_s] for r in rows])


def print_scale(result: dict) -> None:
    print_table("training at real vocabularies (samples/s per stage; busiest worker)",
                ["path", "backend", "ids/field", "stage", "samples/s", "peak RSS MB",
                 "embedding MB"],
                [[r["path"], r["backend"], r["ids_per_field"], r["stage"],
                  r["samples_per_s"], r["peak_rss_mb"], r["embedding_bytes"] / 2**20]
                 for r in result["rows"]])
    g = result["goals"]
    for key, ratio in g["torchrec_speed_ratio"].items():
        say(f"torchrec {key}: {ratio:.2f}x of its speed at the fewest ids (goal >= 0.7)")
    for key, ratio in g["bytes_ratio_2_over_1"].items():
        say(f"{key}: 2 workers hold {ratio:.2f}x of 1 worker's embedding bytes each "
            f"(goal <= 0.6 for torchrec)")
    if result.get("convert_rows_per_s"):
        say(f"convert: {result['convert_rows_per_s']:,.0f} rows/s vs pyarrow.csv read "
            f"{result['pyarrow_csv_rows_per_s']:,.0f} rows/s; peak RSS "
            f"{result['convert_peak_rss_mb']:,.0f} MB")


def print_study(result: dict, study: str) -> None:
    print_table(f"study overhead ({study})",
                ["trials", "wall s", "planned s", "trial training s", "slots",
                 "outside training", "stage-1 reused", "stage-1 saved s"],
                [[result["trials"], result["wall_s"], result["planned_wall_s"],
                  result["train_s"], result["slots"], f"{result['overhead_fraction']:.0%}",
                  result["stage1_reused"], result["stage1_saved_s"]]])
