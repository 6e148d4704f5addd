"""The quality-for-cost trade-off of a study: which trials are on the AUC-vs-FLOPs frontier, and
what the MoE model buys over the dense baseline.

Input everywhere is a list of trial records (plain dicts, JSON-decoded, any field may be missing
or None). Only *usable* records take part: status "completed" with a finite `valid_auc` and a
finite `flops`. Nothing here raises on odd records; they are simply left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

#: What the paper reports, averaged over four public datasets; quoted next to our numbers.
PAPER_CLAIM = "+0.20% AUC and -18.5% FLOPs on average over four public datasets"


def number(value: Any) -> float | None:
    """`value` as a finite float, or None (missing, None, NaN, inf, bool, text)."""
    # bool is an int subclass; a stray True must not read as 1 FLOP.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def usable(records: Iterable[dict], *fields: str) -> list[dict]:
    """The completed records with a finite `valid_auc`, `flops` and every extra field named."""
    need = ("valid_auc", "flops", *fields)
    return [r for r in records
            if isinstance(r, dict) and r.get("status") == "completed"
            and all(number(r.get(f)) is not None for f in need)]


def dominates(q: dict, p: dict, x: str = "flops", y: str = "valid_auc") -> bool:
    """True when `q` is at least as good as `p` on both axes and better on one (min x, max y)."""
    qx, qy, px, py = q[x], q[y], p[x], p[y]
    return qx <= px and qy >= py and (qx < px or qy > py)


def pareto_front(records: Iterable[dict], x: str = "flops", y: str = "valid_auc") -> list[dict]:
    """The non-dominated usable records (minimise `x`, maximise `y`), sorted by `x`.

    Records with exactly the same (x, y) do not dominate each other, so both stay. The output
    order is fully determined by (x, -y, trial_id), hence independent of the input order.
    """
    points = [r for r in usable(records, x, y)]
    points.sort(key=lambda r: (number(r[x]), -number(r[y]), str(r.get("trial_id"))))
    front, best_y, x_at_best = [], -math.inf, math.inf
    # Sweep by increasing x (ties: higher y first): everything seen so far has x <= this x, so a
    # record is dominated exactly when something seen beats its y, or matches it at a lower x.
    for r in points:
        rx, ry = number(r[x]), number(r[y])
        if ry > best_y or (ry == best_y and x_at_best >= rx):
            front.append(r)
            if ry > best_y:
                best_y, x_at_best = ry, rx
    return front


def fronts_by_variant(records: Iterable[dict], x: str = "flops",
                      y: str = "valid_auc") -> dict[str, list[dict]]:
    """`pareto_front` of each variant's records on its own, keyed by variant (sorted names)."""
    groups: dict[str, list[dict]] = {}
    for r in usable(records, x, y):
        groups.setdefault(str(r.get("variant") or "unknown"), []).append(r)
    return {v: pareto_front(groups[v], x, y) for v in sorted(groups)}


def best(records: Iterable[dict]) -> dict | None:
    """The usable record with the highest `valid_auc` (ties: fewer FLOPs), or None."""
    points = usable(records)
    if not points:
        return None
    return max(points, key=lambda r: (r["valid_auc"], -r["flops"]))


@dataclass(frozen=True)
class Roi:
    """What `model` buys over `baseline`. All AUCs are validation AUCs, FLOPs are per sample.

    `flops_saved` is a fraction (0.2 = 20% fewer FLOPs, negative = it costs more) and is None
    when no model trial reaches the baseline's AUC; `auc_gain` is absolute (AUC units) and
    `auc_gain_pct` relative to the baseline AUC in percent, both None when no model trial runs
    within the baseline's FLOPs.
    """

    baseline: str
    model: str
    baseline_trial: str | None
    baseline_auc: float
    baseline_flops: float
    flops_at_auc: float | None = None
    flops_at_auc_trial: str | None = None
    flops_saved: float | None = None
    auc_at_flops: float | None = None
    auc_at_flops_trial: str | None = None
    auc_gain: float | None = None
    auc_gain_pct: float | None = None

    def as_dict(self) -> dict:
        return {"available": True, **asdict(self)}

    def headline(self) -> str:
        """One paragraph of plain English with the two numbers and the paper's for context."""
        base = (f"the best {self.baseline} trial (`{self.baseline_trial}`) has validation AUC "
                f"{self.baseline_auc:.4f} at {si(self.baseline_flops)} FLOPs per sample")
        parts = [f"Against the baseline, {base}."]
        if self.flops_saved is None:
            parts.append(f"No {self.model} trial reaches that AUC.")
        else:
            how = (f"{100 * self.flops_saved:.1f}% fewer FLOPs" if self.flops_saved >= 0
                   else f"{-100 * self.flops_saved:.1f}% more FLOPs")
            parts.append(f"**{self.model} reaches it with {how}** ({si(self.flops_at_auc)}, "
                         f"trial `{self.flops_at_auc_trial}`).")
        if self.auc_gain is None:
            parts.append(f"No {self.model} trial runs within the baseline's FLOPs.")
        else:
            pct = "" if self.auc_gain_pct is None else f", {self.auc_gain_pct:+.2f}%"
            parts.append(f"**At no more FLOPs it gains {self.auc_gain:+.4f} AUC{pct}** "
                         f"(AUC {self.auc_at_flops:.4f}, trial `{self.auc_at_flops_trial}`).")
        parts.append(f"For context, the paper reports {PAPER_CLAIM}.")
        return " ".join(parts)


def roi(records: Iterable[dict], baseline: str = "dense", model: str = "hilomoe") -> Roi | str:
    """The ROI of `model` over `baseline` from the usable records, or a sentence saying why not.

    The baseline point is the best-AUC `baseline` trial. "FLOPs saved" compares the cheapest
    `model` trial with AUC >= the baseline's; "AUC gain" takes the best `model` AUC among trials
    with FLOPs <= the baseline's.
    """
    points = usable(records)
    ref = best(r for r in points if r.get("variant") == baseline)
    ours = [r for r in points if r.get("variant") == model]
    if ref is None or not ours:
        missing = " and ".join(f"no completed {v} trial" for v, gone
                               in ((baseline, ref is None), (model, not ours)) if gone)
        return (f"No ROI headline: there is {missing} with a finite validation AUC and FLOPs, "
                f"so {model} cannot be compared with the {baseline} baseline.")
    auc0, flops0 = float(ref["valid_auc"]), float(ref["flops"])
    out = dict(baseline=baseline, model=model, baseline_trial=_id(ref),
               baseline_auc=auc0, baseline_flops=flops0)

    reaching = [r for r in ours if r["valid_auc"] >= auc0]
    if reaching:
        cheap = min(reaching, key=lambda r: (r["flops"], -r["valid_auc"]))
        out.update(flops_at_auc=float(cheap["flops"]), flops_at_auc_trial=_id(cheap))
        # A zero-FLOP baseline has no meaningful fraction; leave it unset rather than divide.
        if flops0 > 0:
            out["flops_saved"] = 1.0 - float(cheap["flops"]) / flops0

    within = [r for r in ours if r["flops"] <= flops0]
    if within:
        top = max(within, key=lambda r: (r["valid_auc"], -r["flops"]))
        gain = float(top["valid_auc"]) - auc0
        out.update(auc_at_flops=float(top["valid_auc"]), auc_at_flops_trial=_id(top),
                   auc_gain=gain, auc_gain_pct=100.0 * gain / auc0 if auc0 > 0 else None)
    return Roi(**out)


def si(value: float | None) -> str:
    """A count with an SI suffix for people: 12345 -> '12.3K'; None -> '-'."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _id(record: dict) -> str | None:
    trial = record.get("trial_id")
    return None if trial is None else str(trial)
