"""A compute-optimal recommendation: the configuration a study's fitted laws and its frontier
predict is best within a FLOPs budget, and its verification.

    rec = recommend(StudyRun.load("runs/quickstart"), flops=2e4)
    rec.settings, rec.predicted_auc, rec.interval     # what to train, and what to expect
    verify(run, rec)                                  # trains it; recorded with the prediction

The study needs at least one identified law of its design (study/design.py). Candidates, each
with a predicted validation AUC and a 95% interval:
- along each identified law of a design axis (study/design.py): the best trial's settings with
  the axis at the largest value whose FLOPs per sample fit the budget, up to twice the largest
  value tried; AUC and interval from the law and its band (law.auc, law.band);
- the best completed trial within the budget (the frontier): its mean AUC over its repeats,
  with a t interval on the study's pooled seed spread (when the study has repeats).
The recommendation is the candidate with the best predicted AUC. Every recommendation, and its
verification when `--verify` trained it, is appended to `recommendations.jsonl` in the study
directory; the report compares them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hilomoe import jsonio
from hilomoe.errors import HilomoeError
from hilomoe.report.fields import DESIGN_AXIS, DESIGN_FIELD, REPEAT_OF, SETTING
from hilomoe.report.pareto import number, usable
from hilomoe.report.scaling import fit_axis
from hilomoe.report.verdict import MODEL
from hilomoe.study.design import design_center, settings_at
from hilomoe.tracking.records import load_records

RECOMMENDATIONS_FILE = "recommendations.jsonl"
EXTRAPOLATE = 2.0  # a law's recommendation goes at most this far past the largest value tried


@dataclass
class Recommendation:
    flops_budget: float
    settings: dict  # dotted-path overrides of the study's training settings
    flops: float  # per sample, analytic
    predicted_auc: float  # validation AUC
    interval: tuple[float, float] | None  # 95%
    source: str  # "law along experts", "trial 1a2b3c4d"
    extrapolated: bool = False
    candidates: list[dict] = field(default_factory=list)
    achieved: dict | None = None  # after --verify: valid_auc, test_auc, seconds
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)

    def within_interval(self) -> bool | None:
        if self.achieved is None or self.interval is None:
            return None
        lo, hi = self.interval
        return lo <= self.achieved["valid_auc"] <= hi


def recommend(run, flops: float) -> Recommendation:
    """`run`: a StudyRun (study/run_dir.py). Raises HilomoeError in one sentence when the study
    has no fitted law or every trial costs more than `flops`."""
    from hilomoe.data.dataset import open_dataset
    from hilomoe.model.flops import trial_cost

    study_dir = Path(run.study_dir)
    records = load_records(study_dir)
    done = usable(records)
    if not done:
        raise HilomoeError(f"{study_dir}: no completed trial to recommend from.")
    cheapest = min(number(r["flops"]) for r in done)
    if flops < cheapest:
        raise HilomoeError(f"--flops {flops:g}: below every trial's FLOPs per sample (the "
                           f"cheapest, {cheapest:g}); give a budget of at least that.")
    ctx, schema = run.context(), open_dataset(run.dataset, check_shards=False).schema

    def cost(settings: dict) -> float:
        return trial_cost(ctx.config_from(settings), schema)["flops"]

    candidates = []
    center = design_center(records)
    axes = {r.get(DESIGN_AXIS) for r in records} - {None}
    fitted = 0
    for axis in sorted(axes):
        fit = fit_axis(done, DESIGN_FIELD[axis], center.get("variant") if center else MODEL)
        if not fit.identified:
            continue
        fitted += 1
        if axis == "train_size":  # a law in data says what more rows buy, not which model
            continue
        candidate = _along_law(fit, axis, center, cost, flops, ctx)
        if candidate is not None:
            candidates.append(candidate)
    if not fitted:
        raise HilomoeError(f"{study_dir}: no identified scaling law to recommend from; declare "
                           f"`laws: {{axes: [experts]}}` (or levels, rank, mlp_width, "
                           f"train_size) in the study and run it again.")
    frontier = _best_trial(records, flops)
    if frontier is not None:
        candidates.append(frontier)
    if not candidates:
        raise HilomoeError(f"--flops {flops:g}: no configuration along the fitted laws fits "
                           f"the budget; give a larger budget.")
    top = max(candidates, key=lambda c: c["predicted_auc"])
    return Recommendation(flops, top["settings"], top["flops"], top["predicted_auc"],
                          None if top["interval"] is None else tuple(top["interval"]),
                          top["source"], top.get("extrapolated", False), candidates)


def _along_law(fit, axis: str, center: dict, cost, flops: float, ctx) -> dict | None:
    """The largest value along `axis` within the budget, the law's AUC and band there."""
    from hilomoe.config import ConfigError

    tried = max(fit.x)
    if axis == "mlp_width":  # factors on the center's widths; the law is along the first width
        first = number(center["mlp_width"])
        values = [f for f in np.geomspace(1 / 64, EXTRAPOLATE * tried / first, 60)]
        xs = [first * f for f in values]
    else:
        values = list(range(1, int(EXTRAPOLATE * tried) + 1))
        xs = [float(v) for v in values]
    best = None
    for value, x in zip(values, xs):
        settings = settings_at(dict(center["params"]), axis, value, ctx.study.train)
        try:
            spent = cost(settings)
        except ConfigError:  # e.g. fewer experts than top_k
            continue
        if spent <= flops and (best is None or x > best[1]):
            best = (settings, x, spent)
    if best is None:
        return None
    settings, x, spent = best
    band = fit.law.band([x])
    return {"source": f"law along {axis}", "settings": settings, "flops": spent,
            "predicted_auc": float(fit.law.auc([x])[0]),
            "interval": None if band is None else [float(band[0][0]), float(band[1][0])],
            "extrapolated": x > tried, SETTING[axis]: settings[SETTING[axis]]}


def _best_trial(records: list[dict], flops: float) -> dict | None:
    """The completed trial with the best mean AUC (over its repeats) within the budget. Its
    interval is Student's t on the seed spread pooled over every repeated trial of the study
    (a single run's interval too: seed noise is what makes one run differ from the next)."""
    runs: dict[str, list[dict]] = {}
    for r in usable(records):
        runs.setdefault(r.get(REPEAT_OF) or r["trial_id"], []).append(r)
    fits = [(tid, group) for tid, group in runs.items() if number(group[0]["flops"]) <= flops]
    if not fits:
        return None
    tid, group = max(fits, key=lambda g: statistics.fmean(r["valid_auc"] for r in g[1]))
    aucs = [float(r["valid_auc"]) for r in group]
    mean, interval = statistics.fmean(aucs), None
    repeated = [[float(r["valid_auc"]) for r in g] for g in runs.values() if len(g) > 1]
    dof = sum(len(g) - 1 for g in repeated)
    if dof:
        from scipy import stats

        pooled = math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in repeated) / dof)
        half = stats.t.ppf(0.975, dof) * pooled / math.sqrt(len(aucs))
        interval = [mean - half, mean + half]
    original = next(r for r in group if not r.get(REPEAT_OF))
    return {"source": f"trial {tid}" + (f" ({len(aucs)} seeds)" if len(aucs) > 1 else ""),
            "settings": original["params"], "flops": number(original["flops"]),
            "predicted_auc": mean, "interval": interval}


def verify(run, rec: Recommendation) -> Recommendation:
    """Train the recommendation on the study's data (in this process) and record the result."""
    from hilomoe.session import final_metrics, train_local

    t0 = time.perf_counter()
    final = final_metrics(train_local(run.context().config_from(rec.settings)))
    rec.achieved = {"valid_auc": final["valid_auc"], "test_auc": final["test_auc"],
                    "seconds": time.perf_counter() - t0}
    return rec


def save(run, rec: Recommendation) -> None:
    with open(Path(run.study_dir) / RECOMMENDATIONS_FILE, "a") as f:
        f.write(jsonio.dumps(rec.as_dict()) + "\n")


def load_recommendations(study_dir: str | Path) -> list[dict]:
    path = Path(study_dir) / RECOMMENDATIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
