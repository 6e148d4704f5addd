"""What the `hilomoe` command prints: rich tables and lines for a person, one JSON object for a
script.

`out` is stdout (results), `log` is stderr (progress). A command run with `--json` has its
stdout redirected to stderr (cli.main), so `emit_json` writes to the real stdout: it carries
exactly one JSON object. The renderers take the plain dicts the commands return (the same ones
`--json` prints), so both forms show the same numbers. Study and benchmark renderers live next
to their code (`study/console.py`, `bench/console.py`) and use the helpers here.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from hilomoe import jsonio

out = Console(soft_wrap=True)
log = Console(stderr=True, soft_wrap=True)


def emit_json(obj: Any) -> None:
    # the real stdout: while a command runs, stray prints (Ray's, libraries') go to stderr
    sys.__stdout__.write(jsonio.dumps(obj) + "\n")
    sys.__stdout__.flush()


def finish(as_json: bool, result: Any, render: Callable[[], None]) -> int:
    """A command's end: its result as one JSON object (`--json`), else `render()` for a
    person; exit status 0."""
    if as_json:
        emit_json(result)
    else:
        render()
    return 0


def say(text: str) -> None:
    """One line of results on stdout, as written (no rich highlighting)."""
    out.print(text, highlight=False)


def cell(v: Any) -> str:
    """A table cell: integers and large numbers with thousands separators, else 4 decimals."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.4f}"


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A titled table; name-like columns left-aligned, numbers right-aligned."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("variant", "part", "stage") else "right")
    for r in rows:
        t.add_row(*[cell(v) for v in r])
    return t


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    out.print(table(title, columns, rows))


def duration(seconds: float) -> str:
    """75 -> '1m15s', 9 -> '9s'."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def size(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5K'."""
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def ago(seconds: float) -> str:
    """An age in its largest unit: 5400 -> '1.5h'."""
    for unit, step in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= step:
            return f"{seconds / step:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- model summary -------------------------------------------------------------------------------


def print_model_summary(config: str, s: dict) -> None:
    """`hilomoe model summary`'s table and lines, from `model.summary.model_summary`'s dict."""
    rows = [[k, v["params_total"], v["params_active"], v["flops"]] for k, v in s["parts"].items()]
    rows.append(["total", s["params_total"], s["params_active"], s["flops_analytic"]])
    print_table(f"{config}: {s['variant']} model, {s['routing']} routing",
                ["part", "params", "active params", "FLOPs/sample"], rows)
    f, emb = s["fields"], s["embedding"]
    say(f"{f['categorical']} categorical fields ({f['embedding_rows']:,} embedding rows) + "
        f"{f['numeric']} numeric; embedding params {s['params_embedding']:,}; FLOPs/sample "
        f"analytic {s['flops_analytic']:,.0f}, measured (FlopCounterMode, batch {s['batch']}) "
        f"{s['flops_measured']:,.0f}")
    say(f"embedding tables + {emb['optimizer']} state per worker ({emb['backend']}, "
        f"{emb['workers']} worker(s)): "
        + ", ".join(f"{b / 2**20:,.1f} MiB" for b in emb["bytes_per_worker"]))


# -- train ---------------------------------------------------------------------------------------


def epoch_line(stage: str, epoch: int, loss: float, valid: dict, improved: bool,
               samples_per_s: float, tail: str = "") -> None:
    """One epoch's progress on stderr; `*` marks a new best validation AUC."""
    mark = "*" if improved else " "
    log.print(f"[{stage:>7}] epoch {epoch + 1:>3}  loss {loss:.4f}  valid auc {valid['auc']:.4f}"
              f"{mark} logloss {valid['logloss']:.4f}  {samples_per_s:,.0f} samples/s{tail}",
              highlight=False, markup=False)


class RayConsole:
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
        self.seconds.append(event["epoch_seconds"])
        eta = sum(self.seconds) / len(self.seconds) * self._epochs_left(event)
        epoch_line(event["stage"], event["epoch"], event["train_loss"], event["valid"],
                   event["improved"], event["samples_per_s"],
                   f"  elapsed {duration(event['elapsed_s'])}, ETA <= {duration(eta)}")

    def _epochs_left(self, event: dict) -> int:
        """Epochs left in this stage and every enabled later one, at their full budgets."""
        from hilomoe.config import StageName

        names = [n.value for n in StageName if self.stages.get(n).enabled]
        left = self.stages.get(StageName(event["stage"])).epochs - event["epoch"] - 1
        return left + sum(self.stages.get(StageName(n)).epochs
                          for n in names[names.index(event["stage"]) + 1:])


def print_train(title: str, result: dict) -> None:
    """Best validation per stage, then test (and the Bayes ceiling when the data has one)."""
    rows = [[name, s["epochs"], s["auc"], s["logloss"]] for name, s in result["stages"].items()]
    rows.append(["test", "", result["test"]["auc"], result["test"]["logloss"]])
    if result.get("bayes"):
        rows.append(["bayes (test)", "", result["bayes"]["test"]["auc"],
                     result["bayes"]["test"]["logloss"]])
    print_table(f"{title}: best validation per stage, then test",
                ["stage", "epochs", "auc", "logloss"], rows)
    if "out_dir" in result:
        say(f"results, final weights and checkpoints: {result['out_dir']}")


# -- data ----------------------------------------------------------------------------------------


def print_synth(out_dir: str, result: dict) -> None:
    rows = [[s, info["rows"], len(info["files"]), result["extra"]["bayes"][s]["auc"]]
            for s, info in result["splits"].items()]
    print_table(f"{out_dir}: {result['rows_per_s']:,.0f} rows/s",
                ["split", "rows", "files", "bayes auc"], rows)


def print_skipped(result: dict) -> None:
    """The converter's count of malformed rows and its first examples, on stderr."""
    if result["rows_skipped"]:
        log.print(f"skipped {result['rows_skipped']:,} malformed row(s); the first:",
                  highlight=False)
        for example in result["skipped_examples"]:
            log.print(f"  {example}", markup=False, highlight=False)


def print_convert(out_dir: str, result: dict) -> None:
    rows = [[s, info["rows"], len(info["files"])] for s, info in result["splits"].items()]
    print_table(f"{out_dir}: {len(result['fields'])} fields, {result['seconds']:.1f} s",
                ["split", "rows", "files"], rows)


# -- cache ---------------------------------------------------------------------------------------


def cache_rows(entries, now: float) -> list[dict]:
    """Cache entries as JSON rows: ages in seconds before `now`."""
    return [{"kind": e.kind, "key": e.key, "path": e.path, "bytes": e.bytes,
             "age_s": now - e.created, "last_used_s": now - e.used} for e in entries]


def print_cache_entries(title: str, rows: list[dict]) -> None:
    print_table(title, ["kind", "key", "size", "age", "last used"],
                [[r["kind"], r["key"], size(r["bytes"]), ago(r["age_s"]),
                  ago(r["last_used_s"]) + " ago"] for r in rows])
