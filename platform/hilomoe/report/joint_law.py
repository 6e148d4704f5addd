"""The joint scaling law in model size and data (Hoffmann et al. 2022, eq. 2):

    gap(N, D) = E + A / N**alpha + B / D**beta,      gap = 1 - valid AUC,

N the active parameters per sample, D the training rows. E is the irreducible gap; A/N^alpha
what a bigger model removes, B/D^beta what more data removes. Fitted by bounded least squares
(`scipy.optimize.curve_fit`) on N and D rescaled by their geometric means, from a few starting
exponents; Wald 95% intervals from the covariance with n-5 degrees of freedom (as the per-axis
laws in scaling.py). Hoffmann et al. fit a Huber loss on log gaps; with a handful of trials of
one study, plain least squares on the gap and honest intervals say more.

Its points are the study's completed trials of one variant that report both N and D: a law
design along a model axis (D fixed, N varying) and along `train_size` (N fixed, D varying)
crosses at the best configuration, which identifies both exponents. Held-out check: fitted on
the points below the largest N*D, scored on the largest third. A fit whose exponent sits on a
bound, or whose interval reaches 0, is *not identified* (in words, as in scaling.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from hilomoe.report.pareto import number, usable
from hilomoe.report.scaling import AT_BOUND, B_MAX, json_float, t_quantile

NAMES = ("E", "A", "alpha", "B", "beta")
MIN_POINTS, MIN_DISTINCT = 7, 3  # five parameters and two residual degrees of freedom
_LOWER, _UPPER = [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, np.inf, B_MAX, np.inf, B_MAX]


@dataclass
class JointLaw:
    """A fitted joint law; `E`, `A`, `B` on the rescaled N/scale_n, D/scale_d."""

    params: dict[str, float]
    scale_n: float
    scale_d: float
    rmse: float
    dof: int
    ci: dict[str, tuple[float, float]] | None = None

    def gap(self, n, d) -> np.ndarray:
        p = self.params
        return _law((np.asarray(n, float) / self.scale_n, np.asarray(d, float) / self.scale_d),
                    *(p[k] for k in NAMES))

    def auc(self, n, d) -> np.ndarray:
        return 1.0 - self.gap(n, d)

    def as_dict(self) -> dict:
        return {"params": {k: json_float(v) for k, v in self.params.items()},
                "scale_n": self.scale_n, "scale_d": self.scale_d, "rmse": json_float(self.rmse),
                "dof": self.dof, "ci": None if self.ci is None else
                {k: [json_float(lo), json_float(hi)] for k, (lo, hi) in self.ci.items()}}


@dataclass
class JointFit:
    n: list[float] = field(default_factory=list)
    d: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    law: JointLaw | None = None
    reason: str | None = None
    unidentified: str | None = None
    heldout_mae: float | None = None
    heldout_reason: str | None = None

    def as_dict(self) -> dict:
        return {"points": len(self.n), "law": None if self.law is None else self.law.as_dict(),
                "reason": self.reason, "identified": self.law is not None
                and self.unidentified is None, "unidentified_reason": self.unidentified,
                "heldout_mae": json_float(self.heldout_mae), "heldout_reason": self.heldout_reason}


def joint_points(records: Iterable[dict], variant: str = "hilomoe"):
    """(N, D, AUC) of `variant`'s usable records with both N and D."""
    points = [r for r in usable(records, "params_active", "train_rows")
              if r.get("variant") == variant]
    return ([number(r["params_active"]) for r in points], [number(r["train_rows"]) for r in points],
            [number(r["valid_auc"]) for r in points])


def fit_joint(records: Iterable[dict], variant: str = "hilomoe") -> JointFit:
    """The joint law, its identification and its held-out check; never raises."""
    n, d, auc = joint_points(records, variant)
    out = JointFit(n=n, d=d, auc=auc)
    law = fit_joint_law(n, d, auc)
    if isinstance(law, str):
        out.reason = law
        return out
    out.law, out.unidentified = law, joint_identification(law)
    nd = np.array(n) * np.array(d)
    cut = np.quantile(nd, 2 / 3)
    train = nd <= cut
    held = fit_joint_law(np.array(n)[train], np.array(d)[train], np.array(auc)[train])
    if isinstance(held, str):
        out.heldout_reason = f"the fit below the largest N*D failed: {held}"
    elif train.all():
        out.heldout_reason = "no point above the fitting range"
    else:
        errors = np.abs(held.auc(np.array(n)[~train], np.array(d)[~train])
                        - np.array(auc)[~train])
        out.heldout_mae = float(errors.mean())
    return out


def fit_joint_law(n, d, auc) -> JointLaw | str:
    """Fit gap = E + A/N^alpha + B/D^beta; the law, or a sentence saying why there is none."""
    from scipy.optimize import OptimizeWarning, curve_fit

    n, d, auc = (np.asarray(v, dtype=float) for v in (n, d, auc))
    ok = np.isfinite(n) & np.isfinite(d) & np.isfinite(auc) & (n > 0) & (d > 0)
    n, d, gap = n[ok], d[ok], 1.0 - auc[ok]
    distinct = (len(np.unique(n)), len(np.unique(d)))
    if len(gap) < MIN_POINTS or min(distinct) < MIN_DISTINCT:
        return (f"needs {MIN_POINTS} points with {MIN_DISTINCT} distinct N and D each, got "
                f"{len(gap)} points, {distinct[0]} N and {distinct[1]} D")
    sn, sd = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    x = (n / sn, d / sd)
    best = None
    for alpha, beta in ((0.5, 0.5), (0.2, 0.2), (1.0, 1.0), (0.3, 1.0), (1.0, 0.3)):
        p0 = [max(0.0, 0.9 * gap.min()), 0.5 * np.ptp(gap) + 1e-6, alpha,
              0.5 * np.ptp(gap) + 1e-6, beta]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                with np.errstate(all="ignore"):
                    p, cov = curve_fit(_law, x, gap, p0=p0, bounds=(_LOWER, _UPPER),
                                       maxfev=20000)
        except Exception:  # noqa: BLE001 - any scipy failure means "no fit from here"
            continue
        sse = float(np.sum((_law(x, *p) - gap) ** 2))
        if math.isfinite(sse) and (best is None or sse < best[0]):
            best = (sse, p, cov)
    if best is None:
        return "fit did not converge"
    sse, p, cov = best
    dof = len(gap) - len(NAMES)
    law = JointLaw(dict(zip(NAMES, (float(v) for v in p))), sn, sd, math.sqrt(sse / len(gap)),
                   dof)
    if dof >= 1 and np.all(np.isfinite(cov)):
        half = t_quantile(dof) * np.sqrt(np.clip(np.diag(cov), 0, None))
        law.ci = {k: (float(v - h), float(v + h)) for k, v, h in zip(NAMES, p, half)}
    return law


def joint_identification(law: JointLaw) -> str | None:
    """None when both exponents are identified; otherwise why not, in words."""
    for name, axis in (("alpha", "parameters"), ("beta", "data")):
        value = law.params[name]
        if value >= B_MAX * (1 - AT_BOUND) or value <= B_MAX * AT_BOUND:
            return (f"the {axis} exponent {name} sits at its bound ({value:.3g}): the gap does "
                    f"not bend along {axis} over the range tried")
        if law.ci is None:
            return "no intervals (too few points for a degree of freedom)"
        lo, hi = law.ci[name]
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
            return (f"the {axis} exponent {name}'s 95% interval [{lo:.3g}, {hi:.3g}] reaches 0: "
                    f"the range tried cannot tell it from a flat line")
    return None


def _law(x, E, A, alpha, B, beta):
    n, d = x
    return E + A * n ** (-alpha) + B * d ** (-beta)
