"""`hilomoe study recommend`: the best configuration within a FLOPs budget from a study's laws.

A study directory built by hand (no Ray): its study file, a real dataset, and trial records
along a law design whose AUCs follow a known law; `--verify` really trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import hilomoe, one_json
from hilomoe.config import parse_config
from hilomoe.data.dataset import open_dataset
from hilomoe.data.synth import write_synth
from hilomoe.errors import HilomoeError
from hilomoe.study.run_dir import StudyRun
from hilomoe.tracking.records import save_record
from hilomoe.study.recommend import load_recommendations, recommend
from hilomoe.study.spec import parse_study
from hilomoe.study.trial import trial_cost

TRAIN = {"data": {"synth": {"rows": 4000, "categorical_fields": 4, "vocab_size": 10,
                            "numeric_fields": 1, "depth": 2, "branching": 3}},
         "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
                   "moe": {"levels": 2, "experts": 4, "top_k": 2}},
         "stages": {"base": {"epochs": 2}, "experts": {"epochs": 1}, "joint": {"epochs": 1}}}
K = [2, 4, 8, 16, 32, 64]


def law_auc(k):  # gap = 0.1 * K^-0.5 + 0.05
    return 1 - (0.1 * np.asarray(k, float) ** -0.5 + 0.05)


def make_study(tmp_path: Path, with_design: bool = True) -> StudyRun:
    spec = parse_study({"name": "rec", "train": TRAIN,
                        "space": {"model.moe.experts": {"choice": [2, 4]}},
                        **({"laws": {"axes": ["experts"]}} if with_design else {})})
    dataset = tmp_path / "data"
    write_synth(parse_config(TRAIN).data.synth, dataset)
    run = StudyRun(str(tmp_path / "study"), spec.model_dump(mode="json"), str(dataset), "rec",
                   f"sqlite:///{tmp_path / 'mlflow.db'}")
    Path(run.study_dir).mkdir()
    run.save()
    schema = open_dataset(dataset).schema
    noise = np.random.default_rng(0).normal(0, 3e-4, len(K))
    for i, k in enumerate(K if with_design else [2, 4]):
        params = {"model.moe.experts": k}
        cfg = run.context().config_from(params)
        record = {"trial_id": f"k{k}", "status": "completed", "params": params, "seed": 0,
                  "variant": "hilomoe", "experts": k, "levels": 2, "rank": 1, "top_k": 2,
                  "mlp_width": 8, "train_fraction": 1.0, "train_rows": 2800,
                  "valid_auc": float(law_auc(k) + noise[i]), **trial_cost(cfg, schema)}
        if with_design and k not in (2, 4):
            record["design_axis"] = "experts"
        save_record(run.study_dir, record)
    return run


def test_the_largest_k_within_the_budget_is_recommended_with_the_laws_interval(tmp_path):
    run = make_study(tmp_path)
    ctx = run.context()
    schema = open_dataset(run.dataset).schema
    flops = {k: trial_cost(ctx.config_from({"model.moe.experts": k}), schema)["flops"]
             for k in range(2, 129)}
    budget = (flops[20] + flops[21]) / 2  # between K=20 and K=21
    rec = recommend(run, budget)
    assert rec.source == "law along experts" and rec.settings["model.moe.experts"] == 20
    assert rec.flops == flops[20] <= budget and not rec.extrapolated
    lo, hi = rec.interval
    assert lo < rec.predicted_auc < hi and abs(rec.predicted_auc - law_auc(20)) < 2e-3
    # the frontier's best trial within the budget was a candidate, and lost to the law
    assert any(c["source"] == "trial k16" and c["interval"] is None for c in rec.candidates)
    # past the values tried: extrapolated, and said so
    far = recommend(run, flops[100])
    assert far.settings["model.moe.experts"] == 100 and far.extrapolated


def test_bad_requests_get_one_sentence(tmp_path):
    run = make_study(tmp_path)
    with pytest.raises(HilomoeError, match=r"--flops 10: below every trial's FLOPs per sample"):
        recommend(run, 10)
    bare = make_study(tmp_path / "bare", with_design=False)
    with pytest.raises(HilomoeError, match="no identified scaling law to recommend from"):
        recommend(bare, 1e9)
    res = hilomoe("study", "recommend", str(bare.study_dir), "--flops", "1e9", check=False)
    assert res.returncode != 0 and "no identified scaling law" in res.stderr
    assert "Traceback" not in res.stderr


def test_verify_trains_the_recommendation_and_the_report_compares_them(tmp_path):
    run = make_study(tmp_path)
    res = one_json(hilomoe("study", "recommend", run.study_dir, "--flops", "1e9", "--verify",
                           "--json").stdout)
    assert res["achieved"]["valid_auc"] > 0.5 and res["achieved"]["seconds"] > 0
    assert res["settings"]["model.moe.experts"] == 128  # twice the largest K tried
    saved = load_recommendations(run.study_dir)
    assert [r["settings"] for r in saved] == [res["settings"]]
    text = (Path(run.study_dir) / "report" / "report.md").read_text()
    assert "## Recommendations" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1G |"))
    assert f"{res['achieved']['valid_auc']:.4f}" in row and "law along experts" in row
    json.dumps(res)


def test_a_trials_interval_uses_the_seed_spread_pooled_over_the_studys_repeats():
    from scipy import stats

    from hilomoe.study.recommend import _best_trial

    def r(tid, flops, auc, repeat_of=None):
        out = {"trial_id": tid, "status": "completed", "flops": flops, "valid_auc": auc,
               "params": {"seed": 0}}
        return {**out, "repeat_of": repeat_of} if repeat_of else out

    records = [r("a", 10, 0.80), r("a1", 10, 0.82, "a"), r("b", 20, 0.85),
               r("b1", 20, 0.83, "b"), r("b2", 20, 0.87, "b"), r("c", 5, 0.90)]
    pooled = ((0.0002 * 1 + 0.0004 * 2) / 3) ** 0.5  # var(a) = 2e-4, var(b) = 4e-4
    c = _best_trial(records, 100)
    assert c["source"] == "trial c"
    assert c["interval"] == pytest.approx([0.90 - stats.t.ppf(0.975, 3) * pooled,
                                           0.90 + stats.t.ppf(0.975, 3) * pooled])
    assert _best_trial(records, 4) is None  # nothing within the budget
    only_b = _best_trial([x for x in records if x["trial_id"] != "c"], 100)
    half = stats.t.ppf(0.975, 3) * pooled / 3 ** 0.5
    assert only_b["source"] == "trial b (3 seeds)"
    assert only_b["interval"] == pytest.approx([0.85 - half, 0.85 + half])
