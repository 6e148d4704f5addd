"""Noise-aware verdicts: which trials a study trains again with more seeds, and the headline
HiLoMoE-vs-baseline difference with a 95% interval computed from those repeats.

    todo = repeat_points(records, repeats=3, top=4)   # Tune points: the targets, new seeds
    verdict = headline(records)                       # once the repeats have run

After the search, the best baseline (`dense`) trial and the HiLoMoE Pareto front (valid AUC vs
FLOPs, its `top` best by AUC) are trained again with seeds `seed + 1 .. seed + repeats - 1`;
the search trial itself is the repeat with its own seed. A repeat is an ordinary trial record
with `repeat_of` (the search trial's id) and its `seed`.

The headline picks the HiLoMoE point with the best mean validation AUC (selection on the
validation split), then compares test AUC, seed by seed: repeat i of HiLoMoE against repeat i of
the baseline (the same seed gives both the same data order, and the same stage-1 base when
their backbones agree, so the pairs share much of their noise). The difference's interval is
Student's t over the paired differences. "FLOPs at matched AUC" is the FLOPs of the cheapest
repeated HiLoMoE point whose mean test AUC reaches the baseline's, over the baseline's FLOPs;
its interval comes from resampling the seeds (bootstrap).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from hilomoe.report.fields import FIXED, REPEAT_OF
from hilomoe.report.pareto import best, number, pareto_front, usable

BASELINE, MODEL = "dense", "hilomoe"
BOOTSTRAP = 2000  # seed resamples for the FLOPs ratio's interval


def search_records(records: Iterable[dict]) -> list[dict]:
    """The search's own trials (no repeats): what the frontier, tables and laws are made of."""
    return [r for r in records if not r.get(REPEAT_OF)]


def repeat_records(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get(REPEAT_OF)]


def repeat_targets(records: list[dict], top: int) -> list[dict]:
    """The search trials to repeat: the best baseline, and the HiLoMoE frontier's `top` best."""
    points = usable(search_records(records))
    base = best(r for r in points if r.get("variant") == BASELINE)
    front = pareto_front([r for r in points if r.get("variant") == MODEL])
    front = sorted(front, key=lambda r: -float(r["valid_auc"]))[:top]
    return ([base] if base is not None else []) + front


def repeat_points(records: list[dict], repeats: int, top: int) -> list[dict]:
    """Tune points for every (target, seed) not trained yet: the target's params, its seed
    moved on, and `repeat_of`."""
    done = {(r[REPEAT_OF], r.get("seed")) for r in repeat_records(records)}
    out = []
    for target in repeat_targets(records, top):
        seed0 = int(target.get("seed") or 0)
        for seed in range(seed0 + 1, seed0 + repeats):
            if (target["trial_id"], seed) not in done:
                out.append({FIXED: {**target["params"], "seed": seed},
                            REPEAT_OF: target["trial_id"]})
    return out


@dataclass
class Headline:
    """HiLoMoE against the baseline over `seeds` paired seeds."""

    metric: str  # the AUC compared: test_auc (valid_auc where a split has no test metrics)
    seeds: int
    baseline_trial: str
    model_trial: str
    baseline_auc: float  # means over the seeds
    model_auc: float
    auc_diff: float  # model - baseline, mean of the paired differences
    auc_diff_ci: tuple[float, float] | None  # 95%, Student's t; None from a single seed
    verdict: str  # "hilomoe better", "baseline better", "within noise", "single runs"
    flops_ratio: float | None  # FLOPs at matched AUC over the baseline's; None: none matches
    flops_ratio_ci: tuple[float | None, float | None] | None  # None upper: often none matches
    matched_trial: str | None

    def as_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        auc = self.metric.replace("_auc", " AUC")
        diff = f"{self.auc_diff:+.4f}"
        if self.auc_diff_ci is None:
            head = (f"{MODEL} (trial `{self.model_trial}`) minus {BASELINE} (trial "
                    f"`{self.baseline_trial}`), {auc}: {diff} from single runs, with no interval: "
                    f"set `repeats: 3` or more to tell a gain from seed noise.")
        else:
            lo, hi = self.auc_diff_ci
            head = (f"**{MODEL} minus {BASELINE}, {auc} over {self.seeds} seeds: {diff} "
                    f"[{lo:+.4f}, {hi:+.4f}] (95% interval): {self.verdict}** ({MODEL} trial "
                    f"`{self.model_trial}` {self.model_auc:.4f}, {BASELINE} trial "
                    f"`{self.baseline_trial}` {self.baseline_auc:.4f}).")
        if self.flops_ratio is None:
            tail = f"No repeated {MODEL} point reaches the baseline's mean {auc}."
        else:
            ci = ""
            if self.flops_ratio_ci is not None:
                lo, hi = self.flops_ratio_ci
                ci = f" [{_ratio(lo)}, {_ratio(hi)}]"
            tail = (f"At matched {auc} {MODEL} needs {self.flops_ratio:.2f}x{ci} the baseline's "
                    f"FLOPs per sample (trial `{self.matched_trial}`).")
        return f"{head} {tail}"


def _ratio(value: float | None) -> str:
    return "no match" if value is None else f"{value:.2f}x"


def headline(records: list[dict]) -> Headline | str:
    """The verdict from the records (repeats included), or a sentence saying why there is none."""
    groups = _groups(records)
    base_groups = {t: g for t, g in groups.items() if g[0].get("variant") == BASELINE}
    model_groups = {t: g for t, g in groups.items() if g[0].get("variant") == MODEL}
    if not base_groups or not model_groups:
        missing = " and ".join(f"no completed {v} trial" for v, gone in
                               ((BASELINE, not base_groups), (MODEL, not model_groups)) if gone)
        return f"No verdict: there is {missing}."
    n = min(len(g) for g in [*base_groups.values(), *model_groups.values()])
    metric = ("test_auc" if all(number(r.get("test_auc")) is not None
                                for g in groups.values() for r in g[:n]) else "valid_auc")

    def mean(group: list[dict], key: str) -> float:
        return statistics.fmean(float(r[key]) for r in group[:n])

    base_id = max(base_groups, key=lambda t: mean(base_groups[t], "valid_auc"))
    model_id = max(model_groups, key=lambda t: mean(model_groups[t], "valid_auc"))
    base, model = base_groups[base_id], model_groups[model_id]
    diffs = [float(model[i][metric]) - float(base[i][metric]) for i in range(n)]
    diff = statistics.fmean(diffs)
    ci, verdict = None, "single runs"
    if n >= 2:
        from scipy import stats

        half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        ci = (diff - half, diff + half)
        verdict = (f"{MODEL} better" if ci[0] > 0 else f"{BASELINE} better" if ci[1] < 0
                   else "within noise")

    found, ratio_ci = _matched(base, model_groups, metric, n), None
    if found is not None and n >= 2:
        idx = np.random.default_rng(0).integers(0, n, (BOOTSTRAP, n))  # seed resamples
        ratios = _matched_ratios(base, model_groups, metric, idx)
        lo, hi = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")  # no inf - inf
        ratio_ci = (float(lo) if math.isfinite(lo) else None,
                    float(hi) if math.isfinite(hi) else None)
    return Headline(metric, n, base_id, model_id, mean(base, metric), mean(model, metric), diff,
                    ci, verdict, None if found is None else found[0], ratio_ci,
                    None if found is None else found[1])


def _matched(base: list[dict], model_groups: dict[str, list[dict]], metric: str,
             n: int) -> tuple[float, str] | None:
    """(FLOPs ratio, trial) of the cheapest HiLoMoE point whose mean AUC reaches the
    baseline's, over all `n` seeds; None when none does."""
    target = statistics.fmean(float(r[metric]) for r in base[:n])
    reaching = [(float(g[0]["flops"]), t) for t, g in model_groups.items()
                if statistics.fmean(float(r[metric]) for r in g[:n]) >= target]
    if not reaching:
        return None
    flops, trial = min(reaching)
    return flops / float(base[0]["flops"]), trial


def _matched_ratios(base: list[dict], model_groups: dict[str, list[dict]], metric: str,
                    idx: np.ndarray) -> np.ndarray:
    """`_matched`'s ratio for each row of seed indices `idx` (R, n); inf where none reaches."""
    def means(group: list[dict]) -> np.ndarray:
        return np.array([float(r[metric]) for r in group])[idx].mean(axis=1)

    target, flops0 = means(base), float(base[0]["flops"])
    out = np.full(len(idx), math.inf)
    # dearest first, so that a cheaper point reaching the target overwrites a dearer one
    for group in sorted(model_groups.values(), key=lambda g: -float(g[0]["flops"])):
        out[means(group) >= target] = float(group[0]["flops"]) / flops0
    return out


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    """Search trial id -> its completed runs (itself first, then its repeats by seed)."""
    done = [r for r in usable(records) if r.get("status") == "completed"]
    groups = {r["trial_id"]: [r] for r in search_records(done)}
    for r in sorted(repeat_records(done), key=lambda r: r.get("seed") or 0):
        if r[REPEAT_OF] in groups:
            groups[r[REPEAT_OF]].append(r)
    # with repeats, only the repeated points take part (a single run is not comparable)
    repeated = {t: g for t, g in groups.items() if len(g) > 1}
    return repeated or groups
