"""The live trial table of `hilomoe study run`, and what `study run / plan / recommend` print.

Tune pickles its callbacks into the study's state (to restore them with the study), so the
table holds only plain data and makes its rich console lazily. On a terminal it redraws one
table in place; elsewhere (a log file, CI) it prints one line per trial event.
"""

from __future__ import annotations

import math
import time
from typing import Any

from hilomoe.console import duration, print_table, say


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


class TrialTable:
    def __init__(self, labels: dict[str, str], total: int, redraw_s: float = 1.0):
        self.labels, self.total, self.redraw_s = labels, total, redraw_s
        self.rows: dict[str, dict] = {}
        self._console = self._live = None
        self._drawn = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_console": None, "_live": None}

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, soft_wrap=True, highlight=False)
        return self._console

    def __call__(self, event: dict) -> None:
        kind, tid = event["kind"], event.get("trial_id")
        if kind in ("warning", "phase"):
            self.total += event.get("trials", 0)  # a phase after the search: its trials count
            prefix = "warning: " if kind == "warning" else ""
            self.console.print(f"{prefix}{event['message']}", markup=False)
            return
        if kind == "trial_recover":
            self.console.print(f"trial {tid} lost its process or node; it continues from its "
                               f"last checkpoint", markup=False)
            return
        if kind == "end":
            if self._live is not None:
                self._live.update(self.render(), refresh=True)
                self._live.stop()
                self._live = None
            return
        row = self.rows.setdefault(tid, {"status": "running", "params": event.get("params", {})})
        if kind == "result":
            row.update(stage=event["stage"], epoch=event["epoch"] + 1, auc=event["valid_auc"],
                       best=max(row.get("best", float("-inf")), event["valid_auc"]))
        elif kind == "trial_end":
            r = event["record"]
            row.update(status=r["status"], auc=r.get("valid_auc"), test=r.get("test_auc"),
                       flops=r.get("flops"), reused=r.get("stage1_reused"),
                       replayed=r.get("trial_reused"))
        if self.console.is_terminal:
            self._redraw(force=kind != "result")
        elif kind in ("trial_start", "trial_end"):
            self.console.print(self._line(tid, kind), markup=False)

    def _line(self, tid: str, kind: str) -> str:
        row = self.rows[tid]
        params = " ".join(f"{self.labels.get(k, k)}={_fmt(v)}" for k, v in row["params"].items())
        done = sum(r["status"] != "running" for r in self.rows.values())
        if kind == "trial_start":
            return f"trial {tid} started   {params}"
        reused = (" (replayed: trained before)" if row.get("replayed")
                  else " (stage 1 reused)" if row.get("reused") else "")
        return (f"trial {tid} {row['status']:<9} valid auc {_fmt(row.get('auc'))} test auc "
                f"{_fmt(row.get('test'))} FLOPs {_fmt(row.get('flops'))}{reused}   "
                f"[{done}/{self.total} done]")

    def _redraw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < self.redraw_s:
            return
        self._drawn = now
        if self._live is None:
            from rich.live import Live

            self._live = Live(self.render(), console=self.console, auto_refresh=False)
            self._live.start()
        self._live.update(self.render(), refresh=True)

    def render(self):
        from rich.table import Table

        done = sum(r["status"] != "running" for r in self.rows.values())
        table = Table(title=f"trials: {done}/{self.total} done", title_justify="left")
        keys = list(self.labels)
        for c in ["trial", "status", *self.labels.values(), "stage", "epoch", "valid auc",
                  "best", "test auc", "FLOPs"]:
            table.add_column(c, justify="left" if c in ("trial", "status", "stage") else "right")
        for tid, r in self.rows.items():
            table.add_row(tid, r["status"], *[_fmt(r["params"].get(k)) for k in keys],
                          r.get("stage", "-"), _fmt(r.get("epoch")), _fmt(r.get("auc")),
                          _fmt(r.get("best")), _fmt(r.get("test")), _fmt(r.get("flops")))
        return table


# -- what `hilomoe study run / plan / recommend` print at the end ------------------------------


def print_study(summary: dict) -> None:
    """A finished study: counts, the best trial, the verdict, the laws, the Pareto set, and
    where to browse it."""
    best, c = summary["best"], summary["counts"]
    say(f"{c['completed']} trials completed, {c['pruned']} pruned, {c['failed']} failed; "
        f"stage 1 reused by {summary['stage1_reused']} (saved "
        f"{duration(summary['stage1_saved_s'])} of training)")
    if best:
        m = best["metrics"]
        params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        say(f"best trial {best['trial_id']}: valid auc {m['valid_auc']:.4f}, test auc "
            f"{m['test_auc']:.4f}, {m['flops']:,.0f} FLOPs/sample ({params})")
    h = summary.get("headline") or {}
    if "verdict" in h:
        ci = h.get("auc_diff_ci")
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}] (95%)" if ci else ""
        say(f"verdict over {h['seeds']} seed(s): {h['verdict']} (hilomoe minus dense, "
            f"{h['metric']}: {h['auc_diff']:+.4f}{interval})")
    for axis, law in (summary.get("laws") or {}).items():
        mae = law.get("heldout_mae")
        state = ("identified" if law["identified"] else f"not identified ({law['reason']})")
        say(f"law along {axis}: {state}"
            f"{'' if mae is None else f', held-out error {mae:.4f} AUC'}")
    print_table("Pareto set (validation AUC vs FLOPs per sample)",
                ["variant", "trial", "auc", "FLOPs"],
                [[p["variant"], p["trial_id"], p["auc"], p["flops"]] for p in summary["pareto"]])
    local = not summary["tracking_uri"].startswith(("http://", "https://"))
    say(f"report: {summary['report']}\nbrowse every trial: "
        f"{'hilomoe ui, then ' if local else ''}{summary['mlflow_url'] or 'MLflow'}   "
        f"(experiment {summary['mlflow_experiment']!r} at {summary['tracking_uri']})")


def print_plan(plan) -> None:
    """A study's cost plan (`study.plan.StudyPlan`): the sentence, phases, calibration."""
    say(plan.sentence())
    print_table("phases (mean over the draws)", ["phase", "trials", "trial-seconds", "wall s"],
                [[p.phase, f"{p.trials:.0f}", f"{p.trial_s:.0f}", f"{p.wall_s:.0f}"]
                 for p in plan.phases])
    cal = plan.calibration
    print_table(f"calibration ({cal.device}, {cal.threads} thread(s))",
                ["point", "stage", "batch", "FLOPs/sample", "samples/s"],
                [[m.point, m.stage, m.batch, f"{m.flops:,.0f}", f"{m.samples_per_s:,.0f}"]
                 for m in cal.train])
    for line in plan.assumptions:
        say(f"assumes: {line}")


def print_recommendation(rec, flops: float) -> None:
    """A recommendation (`study.recommend`): what, its predicted AUC band, and if verified,
    the achieved AUC against it."""
    ci = "" if rec.interval is None else f" [{rec.interval[0]:.4f}, {rec.interval[1]:.4f}]"
    say(f"within {flops:,.0f} FLOPs per sample: {rec.source}"
        f"{' (extrapolated past the values tried)' if rec.extrapolated else ''}, "
        f"{rec.flops:,.0f} FLOPs, predicted valid AUC {rec.predicted_auc:.4f}{ci} (95%)")
    say("settings: " + ", ".join(f"{k}={v}" for k, v in rec.settings.items()))
    if rec.achieved is not None:
        inside = rec.within_interval()
        where = ("" if inside is None else " (inside the interval)" if inside
                 else " (outside the interval)")
        say(f"verified: achieved valid AUC {rec.achieved['valid_auc']:.4f} against "
            f"{rec.predicted_auc:.4f} predicted{where}")
