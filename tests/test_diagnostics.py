"""Diagnostics that explain a verdict: per-stage AUC, the overfitting gap, routing (no Ray)."""

from __future__ import annotations

import math

import pytest

from hilomoe.report.diagnostics import diagnostics, flat
from hilomoe.report.writer import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def epoch(stage, auc, logloss=0.5, task=0.45, util=(1.0, 0.75), ent=(1.2, 0.9), paths=11.0):
    e = {"stage": stage, "valid_auc": auc, "valid_logloss": logloss, "train_task": task,
         "train_loss": task + 0.01}
    if stage != "base":
        for i, (u, h) in enumerate(zip(util, ent)):
            e[f"valid_level{i + 1}_utilisation"] = u
            e[f"valid_level{i + 1}_entropy"] = h
        e["valid_paths"] = paths
    return e


RESULTS = [epoch("base", 0.70), epoch("base", 0.72, logloss=0.48, task=0.40),
           epoch("experts", 0.73), epoch("experts", 0.74, util=(0.5, 0.25)),
           epoch("joint", 0.76, logloss=0.47, task=0.41, util=(0.875, 0.5), ent=(1.5, 1.0),
                 paths=20.0),
           epoch("joint", 0.75), {"final": True, "valid_auc": 0.76}]


def test_each_stage_at_its_best_epoch_and_the_final_models_routing():
    d = diagnostics(RESULTS)
    assert d["stage_auc"] == {"base": 0.72, "experts": 0.74, "joint": 0.76}
    assert d["overfit_gap"] == pytest.approx(0.47 - 0.41)  # the joint stage's best epoch
    assert d["routing"] == {"utilisation": [0.875, 0.5], "entropy": [1.5, 1.0], "paths": 20.0}
    m = flat(d)
    assert m["joint_valid_auc"] == 0.76 and m["final_level2_utilisation"] == 0.5
    assert m["final_paths"] == 20.0 and m["overfit_gap"] == pytest.approx(0.06)


def test_a_dense_trial_has_stage_auc_and_gap_but_no_routing():
    d = diagnostics([epoch("base", 0.70), epoch("base", 0.71, logloss=0.5, task=0.3)])
    assert d["stage_auc"] == {"base": 0.71} and d["routing"] is None
    assert d["overfit_gap"] == pytest.approx(0.2)
    assert diagnostics([]) == {"stage_auc": {}, "overfit_gap": None, "routing": None}


def test_the_report_explains_each_hilomoe_trial_with_a_utilisation_heatmap(tmp_path):
    def rec(tid, variant, auc, results, **extra):
        return {"trial_id": tid, "status": "completed", "variant": variant, "valid_auc": auc,
                "flops": 100.0, "experts": 8, "levels": 2, **diagnostics(results), **extra}

    records = [rec("d", "dense", 0.72, RESULTS[:2]), rec("h", "hilomoe", 0.76, RESULTS)]
    report = write_report(records, tmp_path / "out", "diag")
    text = report.markdown.read_text()
    assert "## Diagnostics" in text and "![per-level expert utilisation](utilisation.png)" in text
    row = next(line for line in text.splitlines() if line.startswith("| `h`"))
    # L x K, base, experts, joint, joint - base, gap, paths, mean entropy / log 8
    assert "| 2 x 8 | 0.7200 | 0.7400 | 0.7600 | +0.0400 | +0.0600 | 20 |" in row
    assert f"{1.25 / math.log(8):.2f}" in row
    assert (tmp_path / "out" / "utilisation.png").read_bytes()[:8] == PNG
