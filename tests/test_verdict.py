"""Noise-aware verdicts: which trials are repeated, and the headline's interval from the repeats.

Pure and fast: synthetic trial records, no Ray, no training.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from hilomoe.report.verdict import Headline, headline, repeat_points, repeat_targets


def rec(trial_id, variant, flops, valid, test=None, seed=0, repeat_of=None, **params) -> dict:
    r = {"trial_id": trial_id, "status": "completed", "variant": variant, "flops": flops,
         "valid_auc": valid, "test_auc": valid if test is None else test, "seed": seed,
         "params": {"model.moe.variant": variant, **params}}
    if repeat_of:
        r["repeat_of"] = repeat_of
    return r


def group(tid, variant, flops, tests, **params) -> list[dict]:
    """A search trial (seed 0) and its repeats (seeds 1..), test AUC as given (valid = test)."""
    return [rec(tid if i == 0 else f"{tid}-r{i}", variant, flops, auc, seed=i,
                repeat_of=None if i == 0 else tid, **params) for i, auc in enumerate(tests)]


def test_the_best_baseline_and_the_hilomoe_front_are_repeated_with_new_seeds():
    records = [rec("d1", "dense", 100, 0.70), rec("d2", "dense", 200, 0.72),
               rec("h1", "hilomoe", 120, 0.73), rec("h2", "hilomoe", 90, 0.71),
               rec("h3", "hilomoe", 130, 0.72),  # dominated by h1
               rec("h4", "hilomoe", 300, 0.74), rec("f1", "flat", 50, 0.9)]
    assert [r["trial_id"] for r in repeat_targets(records, top=2)] == ["d2", "h4", "h1"]
    todo = repeat_points(records, repeats=3, top=2)
    assert [(p["repeat_of"], p["settings"]["seed"]) for p in todo] == [
        ("d2", 1), ("d2", 2), ("h4", 1), ("h4", 2), ("h1", 1), ("h1", 2)]
    assert todo[0]["settings"] == {"model.moe.variant": "dense", "seed": 1}
    # a repeat already recorded is not trained again; repeats are never targets themselves
    done = records + [rec("x", "hilomoe", 300, 0.99, seed=1, repeat_of="h4")]
    assert ("h4", 1) not in [(p["repeat_of"], p["settings"]["seed"])
                             for p in repeat_points(done, 3, 2)]
    assert repeat_points(records, repeats=1, top=2) == []


def test_a_gain_beyond_the_noise_has_an_interval_above_zero():
    records = (group("d", "dense", 100, [0.70, 0.71, 0.72])
               + group("h", "hilomoe", 80, [0.72, 0.73, 0.74]))
    h = headline(records)
    assert isinstance(h, Headline) and h.seeds == 3 and h.metric == "test_auc"
    assert h.auc_diff == pytest.approx(0.02)
    assert h.auc_diff_ci == pytest.approx((0.02, 0.02))  # equal paired differences: no spread
    assert h.verdict == "hilomoe better"
    assert h.flops_ratio == pytest.approx(0.8) and h.matched_trial == "h"
    assert "hilomoe better" in h.sentence() and "0.80x" in h.sentence()


def test_the_interval_is_students_t_over_the_paired_differences():
    base = [0.70, 0.72, 0.71, 0.69]
    diffs = [0.01, -0.01, 0.03, 0.00]
    records = (group("d", "dense", 100, base)
               + group("h", "hilomoe", 120, [b + d for b, d in zip(base, diffs)]))
    h = headline(records)
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(4)
    half = stats.t.ppf(0.975, 3) * se  # 3.182 * 0.0091 = 0.029
    assert h.auc_diff == pytest.approx(mean)
    assert h.auc_diff_ci == pytest.approx((mean - half, mean + half))
    assert h.verdict == "within noise" and "within noise" in h.sentence()
    assert h.flops_ratio == pytest.approx(1.2)  # the only HiLoMoE point reaches the baseline
    lo, hi = h.flops_ratio_ci
    assert lo == pytest.approx(1.2) and hi is None  # some seed resamples have no match


def test_the_point_is_chosen_on_validation_and_judged_on_test():
    records = (group("d", "dense", 100, [0.70, 0.70])
               + [dict(r, valid_auc=0.9) for r in group("v", "hilomoe", 50, [0.60, 0.60])]
               + group("t", "hilomoe", 200, [0.75, 0.75]))
    h = headline(records)
    assert h.model_trial == "v" and h.auc_diff == pytest.approx(-0.10)
    assert h.verdict == "dense better"
    assert h.matched_trial == "t" and h.flops_ratio == pytest.approx(2.0)


def test_single_runs_give_no_interval_and_say_so():
    h = headline([rec("d", "dense", 100, 0.70), rec("h", "hilomoe", 80, 0.71)])
    assert h.auc_diff_ci is None and h.verdict == "single runs"
    assert "repeats: 3" in h.sentence()
    assert "no completed dense trial" in headline([rec("h", "hilomoe", 80, 0.71)])


def test_the_interval_covers_the_true_difference_95_percent_of_the_time():
    """Coverage over simulated studies: a true gain of 0.002 AUC, seed noise shared by the pair
    (sd 0.004) plus noise of each run's own (sd 0.001), 3 seeds."""
    rng = np.random.default_rng(7)
    true, covered, n = 0.002, 0, 1000
    for _ in range(n):
        shared = rng.normal(0, 0.004, 3)
        base = 0.75 + shared + rng.normal(0, 0.001, 3)
        ours = 0.75 + true + shared + rng.normal(0, 0.001, 3)
        h = headline(group("d", "dense", 100, list(base)) + group("h", "hilomoe", 80, list(ours)))
        lo, hi = h.auc_diff_ci
        covered += lo <= true <= hi
    assert 0.93 <= covered / n <= 0.97
