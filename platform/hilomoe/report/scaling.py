"""Scaling laws: how the AUC gap closes as a model grows along one axis.

The law is a saturating power law in the *gap* to a perfect ranker,

    gap(C) = a * C**(-b) + c,        gap = 1 - valid_auc,

with `c` the irreducible gap. It is fitted by `scipy.optimize.curve_fit` (bounded: a >= 0,
0 <= b <= 5, 0 <= c <= 1) on C rescaled by its geometric mean, because raw C spans orders of
magnitude and makes `a` and `b` almost collinear; `a` is reported back in raw units.

Uncertainty: parameter intervals are Wald 95% intervals from the fit covariance (residual
variance estimated from the data) with a t-distribution of n-3 degrees of freedom; they may
cross a bound. The curve's 95% band is pointwise, for the mean curve, by the delta method
(gradient of gap(C) through that covariance): deterministic and cheap, no resampling.

Predictive check: points sorted by C, the law fitted on the smaller half of the distinct C
values (the middle one included when their count is odd) and scored on the larger half.

Identification: a fit can converge and still say nothing. When the exponent sits at a bound
(b = 0: no fall at all; b = 5: the gap drops at once and the rest is the floor c) or its
interval reaches 0, the points cannot tell the law from a flat line: the axis is reported as
*not identified*, with the reason in words and the values that would identify it (a range
twice as wide at each end), and its plot shows the points without a curve.

Nothing here raises on bad data: every result carries a `reason` when it could not be computed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from hilomoe.report.fields import DESIGN_FIELD, SETTING
from hilomoe.report.pareto import number, usable

#: Record field -> what it is called in the report.
AXES = {
    "params_active": "active parameters",
    "params_total": "parameters",
    "flops": "FLOPs per sample",
    "experts": "experts K",
    "levels": "levels L",
    "rank": "LoRA rank r",
}
#: Axes fitted only when a law design varied them (study/design.py): record field -> label.
DESIGN_AXES = {"mlp_width": "MLP width (first layer)", "train_rows": "training rows D"}
#: Architecture knobs: other settings (lr, ...) vary too, so only the best trial per value counts.
ENVELOPE_AXES = frozenset({"experts", "levels", "rank"})
#: Axes whose values are counts: proposed values are whole numbers.
INTEGER_AXES = frozenset({"experts", "levels", "rank", "params_active", "params_total"})

MIN_DISTINCT = 3   # a 3-parameter curve through fewer distinct x values is not determined
MIN_POINTS = 4     # at least one residual degree of freedom, else no interval
MIN_HELDOUT_DISTINCT = 6   # both halves need MIN_DISTINCT distinct x values
LEVEL = 0.95
B_MAX = 5.0
_BOUNDS = ([0.0, 0.0, 0.0], [np.inf, B_MAX, 1.0])
AT_BOUND = 1e-3  # relative distance from a bound that counts as sitting on it


@dataclass
class PowerLaw:
    """A fitted gap(C) = a * C**(-b) + c.

    Stored as `a_scaled`, the coefficient of (C / scale)**(-b), which is what the fit estimates;
    `a` gives it back in raw units of C. `cov` is the covariance of (a_scaled, b, c) and `dof`
    its residual degrees of freedom. `ci` maps "a", "b", "c" to (low, high), or is None when the
    covariance could not be estimated (no degree of freedom, a singular Jacobian).
    """

    a_scaled: float
    b: float
    c: float
    scale: float
    rmse: float
    dof: int
    cov: np.ndarray | None = None
    ci: dict[str, tuple[float, float]] | None = None

    @property
    def a(self) -> float:
        with np.errstate(all="ignore"):   # a huge scale**b is inf, reported as null
            return float(self.a_scaled * np.power(self.scale, self.b))

    def gap(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        u = np.asarray(x, dtype=float) / self.scale
        with np.errstate(all="ignore"):
            return self.a_scaled * u ** (-self.b) + self.c

    def auc(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        return 1.0 - self.gap(x)

    def band(self, x: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise 95% band of the AUC curve at `x` as (low, high), or None without a cov."""
        if self.cov is None or self.dof < 1:
            return None
        u = np.asarray(x, dtype=float) / self.scale
        with np.errstate(all="ignore"):
            grad = _jac(u, self.a_scaled, self.b, self.c)
            var = np.einsum("ni,ij,nj->n", grad, self.cov, grad).clip(0)
            half = t_quantile(self.dof) * np.sqrt(var)
        centre = self.auc(x)
        return centre - half, centre + half

    def as_dict(self) -> dict:
        return {"a": json_float(self.a), "b": json_float(self.b), "c": json_float(self.c),
                "a_scaled": json_float(self.a_scaled), "scale": json_float(self.scale),
                "rmse": json_float(self.rmse), "dof": self.dof,
                "ci": None if self.ci is None
                else {k: [json_float(lo), json_float(hi)] for k, (lo, hi) in self.ci.items()}}


@dataclass
class HeldOut:
    """The law fitted on the small-C half, scored on the large-C half (errors in AUC units)."""

    split: float            # the largest C of the fitting half
    n_fit: int
    n_test: int
    mae: float
    max_abs: float
    law: PowerLaw

    def as_dict(self) -> dict:
        return {"split": json_float(self.split), "n_fit": self.n_fit, "n_test": self.n_test,
                "mae": json_float(self.mae), "max_abs": json_float(self.max_abs)}


@dataclass
class AxisFit:
    """Everything the report needs about one axis: its points, the law, the held-out check.

    `law` is None with `reason` saying why; `heldout` is None with `heldout_reason` saying why.
    `x`, `auc` and `trials` are the points the law saw (for K, L, r: the best trial per value).
    """

    axis: str
    x: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    trials: list[str | None] = field(default_factory=list)
    law: PowerLaw | None = None
    reason: str | None = None
    heldout: HeldOut | None = None
    heldout_reason: str | None = None
    unidentified: str | None = None  # why a fitted law says nothing (see `identification`)
    propose: list[float] = field(default_factory=list)  # values that would identify it

    @property
    def identified(self) -> bool:
        return self.law is not None and self.unidentified is None

    @property
    def label(self) -> str:
        return AXES.get(self.axis) or DESIGN_AXES.get(self.axis, self.axis)

    def as_dict(self) -> dict:
        return {"axis": self.axis, "label": self.label, "n": len(self.x),
                "distinct": len(set(self.x)),
                "x": [json_float(v) for v in self.x], "auc": [json_float(v) for v in self.auc],
                "trials": self.trials,
                "law": None if self.law is None else self.law.as_dict(), "reason": self.reason,
                "identified": self.identified, "unidentified_reason": self.unidentified,
                "propose": [json_float(v) for v in self.propose],
                "heldout": None if self.heldout is None else self.heldout.as_dict(),
                "heldout_reason": self.heldout_reason}


def fit_power_law(x: Iterable[float], auc: Iterable[float]) -> PowerLaw | str:
    """Fit gap = 1 - auc = a * x**(-b) + c; the law, or a sentence saying why there is none.

    Pairs with a non-finite value or x <= 0 are dropped first. Needs MIN_DISTINCT distinct x
    values and MIN_POINTS points.
    """
    xs, gaps, dropped = _clean(x, auc)
    why = _too_few(xs, dropped, MIN_DISTINCT, MIN_POINTS)
    return why or _fit(xs, gaps)


def heldout_check(x: Iterable[float], auc: Iterable[float]) -> HeldOut | str:
    """Fit on the smaller half of the distinct x values, predict the rest; or why not."""
    xs, gaps, dropped = _clean(x, auc)
    distinct = np.unique(xs)
    if len(distinct) < MIN_HELDOUT_DISTINCT:
        return (f"the held-out check needs {MIN_HELDOUT_DISTINCT} distinct values, "
                f"got {len(distinct)}" + _dropped(dropped))
    split = distinct[(len(distinct) + 1) // 2 - 1]
    train, test = xs <= split, xs > split
    law = _fit(xs[train], gaps[train])
    if isinstance(law, str):
        return f"the fit on the smaller half failed: {law}"
    errors = np.abs(law.gap(xs[test]) - gaps[test])   # |gap error| = |AUC error|
    if not np.all(np.isfinite(errors)):
        return "the fit on the smaller half predicts non-finite values on the larger half"
    return HeldOut(split=float(split), n_fit=int(train.sum()), n_test=int(test.sum()),
                   mae=float(errors.mean()), max_abs=float(errors.max()), law=law)


def axis_points(records: Iterable[dict], axis: str,
                variant: str = "hilomoe") -> tuple[list[float], list[float], list[str | None]]:
    """(x, auc, trial ids) of `variant`'s usable records along `axis`, sorted by x.

    For the architecture knobs (ENVELOPE_AXES) only the best AUC per distinct value is kept:
    the other searched settings vary too, and the law is about what each size can reach.
    """
    points = [r for r in usable(records, axis) if r.get("variant") == variant]
    designed = [r for r in points if DESIGN_FIELD.get(r.get("design_axis")) == axis]
    if designed:  # a grid along this axis, all else fixed: exactly the law's points
        name = designed[0]["design_axis"]
        # the settings the grid shares: its center's (a grid point trained before)
        base = _except(designed[0].get("params", {}), SETTING[name])
        center = [r for r in points if not r.get("design_axis")
                  and _except(r.get("params", {}), SETTING[name]) == base
                  and not r.get("repeat_of")]
        points = designed + center[:1]
    elif axis != "train_rows":  # a model-size law is at the whole training set
        points = [r for r in points if (number(r.get("train_fraction")) or 1.0) >= 1.0]
    if axis in ENVELOPE_AXES and not designed:
        top: dict[float, dict] = {}
        for r in points:
            key = number(r[axis])
            if key not in top or r["valid_auc"] > top[key]["valid_auc"]:
                top[key] = r
        points = list(top.values())
    points.sort(key=lambda r: (number(r[axis]), -number(r["valid_auc"])))
    return ([number(r[axis]) for r in points], [number(r["valid_auc"]) for r in points],
            [None if r.get("trial_id") is None else str(r["trial_id"]) for r in points])


def _except(params: dict, setting: str) -> dict:
    return {k: v for k, v in params.items() if k != setting}


def fit_axis(records: Iterable[dict], axis: str, variant: str = "hilomoe") -> AxisFit:
    """The law and the held-out check of one axis, never raising."""
    x, auc, trials = axis_points(records, axis, variant)
    out = AxisFit(axis=axis, x=x, auc=auc, trials=trials)
    if not x:
        out.reason = f"no completed {variant} trial reports {axis}"
        out.heldout_reason = "no fit"
        return out
    law = fit_power_law(x, auc)
    if isinstance(law, str):
        out.reason = law
    else:
        out.law = law
        out.unidentified = identification(law)
        if out.unidentified:
            out.propose = proposal(axis, x)
    check = heldout_check(x, auc)
    if isinstance(check, str):
        out.heldout_reason = check
    else:
        out.heldout = check
    return out


def fit_axes(records: Iterable[dict], variant: str = "hilomoe",
             axes: Iterable[str] | None = None) -> dict[str, AxisFit]:
    """`fit_axis` for every axis (default: AXES, and the design axes some record varied),
    keyed by axis in that order."""
    records = list(records)
    if axes is None:
        designed = {DESIGN_FIELD.get(r.get("design_axis")) for r in records}
        axes = [*AXES, *(a for a in DESIGN_AXES if a in designed)]
    return {axis: fit_axis(records, axis, variant) for axis in axes}


def identification(law: PowerLaw) -> str | None:
    """None when the fitted law is identified; otherwise why not, in words."""
    if law.b >= B_MAX * (1 - AT_BOUND):
        return (f"the exponent sits at its bound (b = {B_MAX:g}): the gap falls at once and "
                f"is flat over the rest of the range tried, so the points show only the floor c")
    if law.b <= B_MAX * AT_BOUND:
        return "the exponent sits at 0: the gap does not fall over the range tried"
    if law.ci is None:
        return "the exponent has no interval (too few points for a degree of freedom)"
    lo, hi = law.ci["b"]
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        return (f"the exponent's 95% interval [{lo:.3g}, {hi:.3g}] reaches 0: over the range "
                f"tried the curve cannot be told from a flat line")
    return None


def proposal(axis: str, x: Sequence[float]) -> list[float]:
    """Values that would identify an axis's law: the range tried, widened 4x at each end."""
    lo, hi = min(x), max(x)
    values = [lo / 4, lo / 2, hi * 2, hi * 4]
    if axis in INTEGER_AXES:
        values = [float(max(1, round(v))) for v in values]
    tried = set(x)
    return sorted({v for v in values if v > 0 and v not in tried})


# -- the fit itself -------------------------------------------------------------------------

def _fit(xs: np.ndarray, gaps: np.ndarray) -> PowerLaw | str:
    """Least squares from a few starting exponents; the lowest residual wins."""
    from scipy.optimize import OptimizeWarning, curve_fit

    scale = float(np.exp(np.mean(np.log(xs))))
    u = xs / scale
    fits = []
    for p0 in _starts(u, gaps):
        try:
            with warnings.catch_warnings():
                # An inestimable covariance is reported as a missing interval, not a warning.
                warnings.simplefilter("ignore", OptimizeWarning)
                with np.errstate(all="ignore"):
                    p, cov = curve_fit(_law, u, gaps, p0=p0, jac=_jac, bounds=_BOUNDS,
                                       maxfev=5000)
        except Exception as exc:   # noqa: BLE001 - scipy fails in many types; all mean "no fit"
            fits.append((math.inf, None, None, exc))
            continue
        sse = float(np.sum((_law(u, *p) - gaps) ** 2))
        fits.append((sse if math.isfinite(sse) else math.inf, p, cov, None))
    sse, p, cov, exc = min(fits, key=lambda f: f[0])
    if p is None or not np.all(np.isfinite(p)):
        return f"fit did not converge ({exc})" if exc else "fit did not converge"

    a_scaled, b, c = (float(v) for v in p)
    dof = len(xs) - 3
    law = PowerLaw(a_scaled=a_scaled, b=b, c=c, scale=scale,
                   rmse=math.sqrt(sse / len(xs)), dof=dof)
    if dof >= 1 and cov is not None and np.all(np.isfinite(cov)):
        law.cov = np.asarray(cov, dtype=float)
        law.ci = _intervals(law)
    return law


def _law(u, a, b, c):
    return a * u ** (-b) + c


def _jac(u, a, b, c):
    power = u ** (-b)
    return np.stack([power, -a * power * np.log(u), np.ones_like(u)], 1)


def _starts(u: np.ndarray, gaps: np.ndarray) -> list[list[float]]:
    """Initial guesses: c a bit below the smallest gap, a from the mean excess, a few b."""
    c0 = min(max(0.9 * float(gaps.min()), 0.0), 1.0)
    excess = np.clip(gaps - c0, 1e-12, None)
    # Slope of log(excess) on log(u) is -b when the curve is a pure power above c0.
    slope = np.polyfit(np.log(u), np.log(excess), 1)[0] if np.ptp(np.log(u)) > 0 else 0.0
    b_guess = float(np.clip(-slope, 0.05, 4.5))
    a0 = max(float(np.mean(excess)), 1e-9)
    return [[a0, b, c0] for b in dict.fromkeys([b_guess, 0.1, 0.5, 1.5])]


def _intervals(law: PowerLaw) -> dict[str, tuple[float, float]]:
    t = t_quantile(law.dof)
    var_a, var_b, var_c = np.diag(law.cov)
    # a = a' * scale**b, so its variance comes through both a' and b (delta method).
    with np.errstate(all="ignore"):
        grow = np.power(law.scale, law.b)
        grad = np.array([grow, law.a_scaled * grow * math.log(law.scale)])
        var_raw_a = float(grad @ law.cov[:2, :2] @ grad)
    out = {}
    for name, value, var in (("a", law.a, var_raw_a), ("b", law.b, var_b), ("c", law.c, var_c)):
        # Rounding can make a tiny variance negative; an overflowed one is nan, reported as null.
        half = math.nan if math.isnan(var) else t * math.sqrt(max(var, 0.0))
        out[name] = (value - half, value + half)
    return out


def t_quantile(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + LEVEL / 2, dof))


# -- input hygiene --------------------------------------------------------------------------

def _clean(x: Iterable, auc: Iterable) -> tuple[np.ndarray, np.ndarray, int]:
    """Finite pairs with x > 0 (a power law needs it), as (x, gap, how many were dropped)."""
    pairs = [(number(xi), number(yi)) for xi, yi in zip(x, auc)]
    kept = [(xi, 1.0 - yi) for xi, yi in pairs if xi is not None and yi is not None and xi > 0]
    xs = np.array([p[0] for p in kept], dtype=float)
    gaps = np.array([p[1] for p in kept], dtype=float)
    return xs, gaps, len(pairs) - len(kept)


def _too_few(xs: np.ndarray, dropped: int, distinct: int, points: int) -> str | None:
    have = len(np.unique(xs))
    if have < distinct:
        return f"needs {distinct} distinct values, got {have}" + _dropped(dropped)
    if len(xs) < points:
        return (f"needs {points} points for a degree of freedom, got {len(xs)}"
                + _dropped(dropped))
    return None


def _dropped(n: int) -> str:
    return f" ({n} non-finite or non-positive dropped)" if n else ""


def json_float(value: float | None) -> float | None:
    """JSON has no NaN or inf: those become null."""
    return None if value is None or not math.isfinite(value) else float(value)
