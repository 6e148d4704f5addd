"""The live trial table of `hilomoe study run`.

Tune pickles its callbacks into the study's state (to restore them with the study), so the
table holds only plain data and makes its rich console lazily. On a terminal it redraws one
table in place; elsewhere (a log file, CI) it prints one line per trial event.
"""

from __future__ import annotations

import math
import time
from typing import Any


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
