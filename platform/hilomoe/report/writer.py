"""The study report: from the trial records to `report.md`, `report.html` and the plots
(`pareto.png`, `scaling_<axis>.png`, `utilisation.png`: report/plots.py).

    report = write_report(records, Path("runs/expert_scaling/report"), "expert_scaling")

`records` are the study's trial records (plain dicts, any field may be missing); see
`hilomoe.report.pareto` for which ones take part (completed, finite AUC and FLOPs) and
`hilomoe.report.scaling` for the laws (gap = 1 - valid AUC = a * C**(-b) + c). Pruned trials only
appear as grey markers in the Pareto plot; failed ones only in the trial counts.

Every file is written into a hidden staging folder inside `out_dir` and renamed into place at the
end, plots first and `report.md` last, so a crash leaves either the previous report or the new
one, never a half-written file or a Markdown page linking to a missing image.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hilomoe.report.page import html_page
from hilomoe.report.joint_law import JointFit, fit_joint
from hilomoe.report.pareto import PAPER_CLAIM, Roi, best, number, pareto_front, roi, si, usable
from hilomoe.report.plots import plot_pareto, plot_scaling, plot_utilisation
from hilomoe.report.scaling import AxisFit, fit_axes
from hilomoe.report.verdict import Headline, headline as verdict, search_records

BASELINE, MODEL = "dense", "hilomoe"
STATUSES = ("completed", "pruned", "failed")
#: Record fields shown as the model's shape (L, K, r, k), before any other searched setting.
SHAPE = (("levels", "L"), ("experts", "K"), ("rank", "r"), ("top_k", "k"))


@dataclass
class Report:
    """What `write_report` wrote and found. `as_dict()` is JSON-ready (no NaN, no paths)."""

    markdown: Path
    plots: list[Path] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)   # {"variant","trial_id","auc","flops"}
    roi: dict = field(default_factory=dict)            # Roi.as_dict(), or available=False+reason
    fits: dict = field(default_factory=dict)           # axis -> AxisFit.as_dict()
    counts: dict = field(default_factory=dict)         # status -> trials, plus stage-1 reuse
    headline: dict = field(default_factory=dict)       # Headline.as_dict(), or available=False
    joint: dict = field(default_factory=dict)          # JointFit.as_dict()

    def as_dict(self) -> dict:
        return {"markdown": str(self.markdown), "plots": [str(p) for p in self.plots],
                "pareto": self.pareto, "roi": self.roi, "fits": self.fits, "counts": self.counts,
                "headline": self.headline, "joint": self.joint, "laws": self.laws()}

    def laws(self) -> dict:
        """The fitted laws in brief: per axis whether it is identified, its exponent and its
        held-out error; `joint` for the law in parameters and data."""
        out = {axis: {"identified": f["identified"], "b": f["law"]["b"],
                      "heldout_mae": (f["heldout"] or {}).get("mae"),
                      "reason": f["unidentified_reason"]}
               for axis, f in self.fits.items() if f["law"] is not None}
        if self.joint.get("law"):
            out["joint"] = {"identified": self.joint["identified"],
                            "heldout_mae": self.joint["heldout_mae"],
                            "reason": self.joint["unidentified_reason"]}
        return out


def write_report(records: list[dict], out_dir: Path, title: str,
                 meta: dict | None = None, recommendations: list[dict] | None = None,
                 cost: dict | None = None, links: dict[str, str] | None = None) -> Report:
    """Compute the frontier, the ROI headline and the scaling laws; write the page and plots.

    `meta` (optional) is shown as a key/value list under the title (dataset, date, ...);
    `cost` (optional) is the study's plan against its actual wall time (study/plan.py:compare);
    `links` (optional) maps trial ids to their MLflow run pages, linked from `report.html`.
    Returns the `Report`; `report.md` and `report.html` are always written, plots only when
    there is data.
    """
    everything = [r for r in (records or []) if isinstance(r, dict)]
    records = search_records(everything)  # repeats feed the verdict only: no point twice
    points = usable(records)
    front = pareto_front(points)
    headline = roi(points, BASELINE, MODEL)
    noise = verdict(everything)
    fits = fit_axes(points, MODEL) if points else {}
    joint = fit_joint(points, MODEL)
    counts = {**trial_counts(records), "repeats": len(everything) - len(records)}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        drawn: list[str] = []
        if points:
            plot_pareto(records, headline, stage / "pareto.png")
            drawn.append("pareto.png")
            for axis, fit in fits.items():
                if fit.law is not None:
                    plot_scaling(fit, stage / f"scaling_{axis}.png")
                    drawn.append(f"scaling_{axis}.png")
            if diagnosed(points):
                plot_utilisation(diagnosed(points), stage / "utilisation.png")
                drawn.append("utilisation.png")
        text = markdown(title, meta, records, front, headline, fits, counts, drawn, noise,
                        joint, recommendations or [], cost)
        (stage / "report.md").write_text(text, encoding="utf-8")
        (stage / "report.html").write_text(html_page(text, title, stage, links),
                                           encoding="utf-8")
        for name in [*drawn, "report.md", "report.html"]:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    return Report(
        markdown=out_dir / "report.md", plots=[out_dir / name for name in drawn],
        pareto=[{"variant": r.get("variant"), "trial_id": r.get("trial_id"),
                 "auc": float(r["valid_auc"]), "flops": float(r["flops"])} for r in front],
        roi=headline.as_dict() if isinstance(headline, Roi)
        else {"available": False, "reason": headline},
        fits={axis: fit.as_dict() for axis, fit in fits.items()}, counts=counts,
        joint=joint.as_dict(),
        headline=noise.as_dict() if isinstance(noise, Headline)
        else {"available": False, "reason": noise})


def trial_counts(records: list[dict]) -> dict:
    """Trials per status (anything else under "other"), and what stage-1 reuse saved."""
    counts = {s: sum(r.get("status") == s for r in records) for s in STATUSES}
    counts["other"] = len(records) - sum(counts.values())
    counts["usable"] = len(usable(records))
    reused = [r for r in records if r.get("stage1_reused") is True]
    counts["stage1_reused"] = len(reused)
    counts["stage1_seconds_saved"] = sum(number(r.get("stage1_seconds")) or 0.0 for r in reused)
    return counts


# -- Markdown -------------------------------------------------------------------------------

def markdown(title: str, meta: dict | None, records: list[dict], front: list[dict],
             headline: Roi | str, fits: dict[str, AxisFit], counts: dict,
             plots: list[str], noise: Headline | str = "", joint: JointFit | None = None,
             recommendations: list[dict] = (), cost: dict | None = None) -> str:
    """The whole page; `plots` are the image file names drawn next to it."""
    lines = [f"# {title}", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- **{key}**: {value}")
    if meta:
        lines.append("")
    points = usable(records)
    if not points:
        lines += ["Nothing to report: no completed trial has a finite validation AUC and FLOPs, "
                  "so there is no frontier, ROI or scaling law (and no plot).", ""]
    else:
        lines += ["## Headline", ""]
        if isinstance(noise, Headline):
            lines += [noise.sentence(), ""]
        roi_text = (headline.headline() if isinstance(headline, Roi)
                    else f"{headline} For context, the paper reports {PAPER_CLAIM}.")
        if isinstance(noise, Headline) and noise.auc_diff_ci is not None:
            roi_text = f"From the search's single runs, on validation AUC: {roi_text}"
        lines += [roi_text, ""]
        lines += _pareto_section(front, "pareto.png" in plots)
        lines += _variant_section(points)
        lines += _scaling_section(fits, plots)
        if joint is not None and len(set(joint.d)) > 1:
            lines += _joint_section(joint)
        lines += _diagnostics_section(points, "utilisation.png" in plots)
    if recommendations:
        lines += _recommendation_section(recommendations)
    lines += _counts_section(counts)
    if cost:
        lines += _cost_section(cost)
    return "\n".join(lines).rstrip() + "\n"


def _pareto_section(front: list[dict], plotted: bool) -> list[str]:
    lines = ["## Pareto set", "",
             "Trials no other completed trial beats on both validation AUC and FLOPs per sample.",
             "", "| variant | trial | valid AUC | FLOPs | active params | key params |",
             "|---|---|---:|---:|---:|---|"]
    for r in front:
        lines.append(_row(r.get("variant"), f"`{r.get('trial_id')}`", f"{r['valid_auc']:.4f}",
                          si(number(r["flops"])), si(number(r.get("params_active"))),
                          key_params(r)))
    if plotted:
        lines += ["", "![AUC vs FLOPs per sample](pareto.png)"]
    return lines + [""]


def _variant_section(points: list[dict]) -> list[str]:
    lines = ["## Variants", "", "| variant | trials | best AUC | FLOPs of best | median AUC |",
             "|---|---:|---:|---:|---:|"]
    for variant in sorted({str(r.get("variant") or "unknown") for r in points}):
        mine = [r for r in points if str(r.get("variant") or "unknown") == variant]
        top = best(mine)
        median = statistics.median(float(r["valid_auc"]) for r in mine)
        lines.append(_row(variant, len(mine), f"{top['valid_auc']:.4f}",
                          si(number(top["flops"])), f"{median:.4f}"))
    return lines + [""]


def _scaling_section(fits: dict[str, AxisFit], plots: list[str]) -> list[str]:
    lines = ["## Scaling laws", "",
             f"gap = 1 - valid AUC = a * C^(-b) + c along each axis C, fitted on the {MODEL} "
             "trials (along an axis the study's `laws` declared: its grid, all else fixed; "
             "otherwise, for K, L and r, the best trial per value). Brackets: 95% Wald intervals "
             "(they may cross the bounds a, c >= 0, 0 <= b <= 5); "
             "held-out: fitted on the smaller half of the C values, error on the larger half "
             "in AUC units.", "",
             "| axis | a | b | c | points | held-out MAE (max) |", "|---|---|---|---|---:|---|"]
    for axis, fit in fits.items():
        check = (f"{fit.heldout.mae:.4f} ({fit.heldout.max_abs:.4f})" if fit.heldout
                 else f"skipped: {fit.heldout_reason}")
        if fit.law is None:
            lines.append(_row(fit.label, f"skipped: {fit.reason}", "", "", len(fit.x), check))
            continue
        if fit.unidentified:
            try_ = ", ".join(f"{v:g}" for v in fit.propose)
            lines.append(_row(fit.label, f"not identified: {fit.unidentified}",
                              f"try {try_}" if try_ else "", "", len(fit.x), check))
            continue
        ci = fit.law.ci or {}
        lines.append(_row(fit.label, *(_estimate(getattr(fit.law, k), ci.get(k)) for k in "abc"),
                          len(fit.x), check))
    images = [name for name in plots if name.startswith("scaling_")]
    if images:
        lines.append("")
        lines += [f"![scaling along {name[8:-4]}]({name})" for name in images]
    return lines + [""]


def _joint_section(joint: JointFit) -> list[str]:
    lines = ["## Joint law in parameters and data", "",
             "gap = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022), N active parameters, "
             f"D training rows, over {len(joint.n)} {MODEL} trials (N and D rescaled by their "
             "geometric means); brackets: 95% intervals.", ""]
    if joint.law is None:
        return lines + [f"Not fitted: {joint.reason}.", ""]
    if joint.unidentified:
        lines += [f"**Not identified**: {joint.unidentified}.", ""]
    else:
        ci = joint.law.ci or {}
        lines.append(", ".join(f"{k} = {_estimate(v, ci.get(k))}"
                               for k, v in joint.law.params.items()) + ".")
        lines.append("")
    lines.append(f"Held-out (fitted below the largest third of N*D): MAE "
                 f"{joint.heldout_mae:.4f} AUC." if joint.heldout_mae is not None
                 else f"Held-out: skipped, {joint.heldout_reason}.")
    return lines + [""]


def diagnosed(points: list[dict], top: int = 12) -> list[dict]:
    """The best `top` HiLoMoE trials that routed (their diagnostics), by validation AUC."""
    moe = [r for r in points if r.get("variant") == MODEL and (r.get("routing") or {}).get(
        "utilisation")]
    return sorted(moe, key=lambda r: -float(r["valid_auc"]))[:top]


def _diagnostics_section(points: list[dict], plotted: bool) -> list[str]:
    rows = diagnosed(points)
    base = best(r for r in points if r.get("variant") == BASELINE)
    if not rows:
        return []
    lines = ["## Diagnostics", "",
             f"Why {MODEL} won or lost: validation AUC after each stage (the experts on a "
             "frozen base, then joint fine-tuning), the gap between validation logloss and the "
             "training loss of the final model (large: it overfits), the distinct expert paths "
             "per batch and the routing entropy over log K (1: uniform routing).", "",
             "| trial | L x K | base | experts | joint | joint - base | train-valid gap | paths "
             "| entropy / log K |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ([base] if base is not None else []) + rows:
        stage = r.get("stage_auc") or {}
        routing = r.get("routing") or {}
        ent = [e for e in routing.get("entropy") or [] if e is not None]
        k = number(r.get("experts")) or 0
        rel = (f"{statistics.fmean(ent) / math.log(k):.2f}" if ent and k > 1 else "-")
        gain = (f"{stage['joint'] - stage['base']:+.4f}" if "joint" in stage and "base" in stage
                else "-")
        gap = number(r.get("overfit_gap"))
        lines.append(_row(f"`{r.get('trial_id')}`" + (f" ({BASELINE})" if r is base else ""),
                          "-" if r is base else f"{r.get('levels')} x {r.get('experts')}",
                          *(f"{stage[s]:.4f}" if s in stage else "-"
                            for s in ("base", "experts", "joint")),
                          gain, "-" if gap is None else f"{gap:+.4f}",
                          "-" if routing.get("paths") is None else f"{routing['paths']:.0f}", rel))
    if plotted:
        lines += ["", "![per-level expert utilisation](utilisation.png)"]
    return lines + [""]


def _recommendation_section(recommendations: list[dict]) -> list[str]:
    lines = ["## Recommendations", "",
             "Every `hilomoe study recommend` so far: the configuration predicted best within "
             "a FLOPs budget, its predicted validation AUC (95% interval), and what training it "
             "achieved (`--verify`).", "",
             "| FLOPs budget | from | FLOPs | predicted AUC | achieved AUC | inside |",
             "|---:|---|---:|---|---:|---|"]
    for r in recommendations:
        ci = r.get("interval")
        predicted = _estimate(r["predicted_auc"], tuple(ci) if ci else None)
        achieved = (r.get("achieved") or {}).get("valid_auc")
        inside = ("" if achieved is None or not ci
                  else "yes" if ci[0] <= achieved <= ci[1] else "no")
        lines.append(_row(si(r["flops_budget"]), r["source"] + (" (extrapolated)" if
                          r.get("extrapolated") else ""), si(r["flops"]), predicted,
                          "-" if achieved is None else f"{achieved:.4f}", inside))
    return lines + [""]


def _counts_section(counts: dict) -> list[str]:
    lines = ["## Trials", "", "| completed | pruned | failed | other |", "|---:|---:|---:|---:|",
             _row(counts["completed"], counts["pruned"], counts["failed"], counts["other"]), ""]
    unusable = counts["completed"] - counts["usable"]
    if unusable:
        lines += [f"{unusable} completed trial(s) lack a finite validation AUC or FLOPs and are "
                  "left out of everything above.", ""]
    lines += [f"Stage-1 reuse: {counts['stage1_reused']} trial(s) reused a cached stage 1, "
              f"saving {counts['stage1_seconds_saved']:.1f} s of training.", ""]
    if counts.get("repeats"):
        lines += [f"Repeats: {counts['repeats']} more run(s) of the repeated points with other "
                  f"seeds (the headline's interval; not in the tables above).", ""]
    return lines


def _cost_section(cost: dict) -> list[str]:
    wall = cost["wall_s"]
    error = "" if cost.get("error") is None else f" ({cost['error']:+.0%} off)"
    lines = ["## Cost: planned against actual", "",
             f"`hilomoe study plan` predicted {wall['predicted']:.0f} s of wall time "
             f"({cost['wall_range_s'][0]:.0f}-{cost['wall_range_s'][1]:.0f} s over its draws) "
             f"and {cost['cpu_hours']:.2f} CPU-hours; the study took {wall['actual']:.0f} s"
             f"{error}, not counting the plan's {cost['calibration_s']:.0f} s of calibration"
             + (" (the study was resumed: the actual counts its last driver only)."
                if cost.get("resumed") else "."),
             "", "| phase | trials planned | trials run | wall planned (s) | wall actual (s) |",
             "|---|---:|---:|---:|---:|"]
    for p in cost["phases"]:
        lines.append(_row(p["phase"], f"{p['trials']['predicted']:.0f}", p["trials"]["actual"],
                          f"{p['wall_s']['predicted']:.0f}", f"{p['wall_s']['actual']:.0f}"))
    return lines + ["", "A phase's actual wall time runs from its first trial's start to its "
                    "last trial's end; the plan's adds the phase's Tuner start.", ""]


def key_params(record: dict) -> str:
    """The model shape (L, K, r, k) then the other searched settings, compactly."""
    parts = [f"{short}={record[name]}" for name, short in SHAPE
             if record.get(name) is not None and record.get("variant") != BASELINE]
    shown = {name for name, _ in SHAPE}
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    for key, value in sorted(params.items()):
        name = str(key).rsplit(".", 1)[-1]
        if name not in shown:
            parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _estimate(value: float, interval: tuple[float, float] | None) -> str:
    if interval is None:
        return f"{value:.3g} (no interval)"
    return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]"


def _row(*cells) -> str:
    # A "|" inside a trial id or a setting would split the cell.
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
