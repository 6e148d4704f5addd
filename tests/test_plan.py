"""`hilomoe study plan`: the cost plan before a study runs (study/plan.py), without Ray.

Exact values on hand-computable schedules and ASHA cuts; a real calibration on a real dataset
whose prediction counts each phase's trials as the driver would run them; the CLI. That a run
records its actual against the plan is checked by the slow study test (test_study.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import hilomoe, one_json
from hilomoe.study.calibrate import Calibration, Measure, _line, calibrate, corners
from hilomoe.study.plan import Costing, Job, asha_epochs, predict, schedule
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import parse_study
from hilomoe.distributed.runtime import dataset_path

TRAIN = {"data": {"synth": {"rows": 3000, "categorical_fields": 4, "vocab_size": 10,
                            "numeric_fields": 1, "depth": 2, "branching": 3}},
         "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
                   "moe": {"levels": 2, "experts": 4, "top_k": 2}},
         "stages": {"base": {"epochs": 3}, "experts": {"epochs": 2}, "joint": {"epochs": 4}}}
STUDY = {"name": "planned", "train": TRAIN,
         "space": {"model.moe.variant": {"choice": ["dense", "hilomoe"]},
                   "model.moe.experts": {"choice": [2, 4, 8]},
                   "model.backbone.mlp": {"choice": [[8], [16]]}},
         "budget": {"trials": 5, "concurrency": 2, "repeated_points": 1},
         "laws": {"axes": ["train_size"]}, "repeats": 3,
         "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 2}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- exact values -----------------------------------------------------------------------------


def test_asha_cuts_the_joint_stage_by_its_rungs():
    # rungs at 2 and 4 below max_t 7: all run 2 epochs, half 2 more, a quarter the last 2
    assert asha_epochs(6, 2, 2) == 2 + 2 / 2 + 2 / 4
    assert asha_epochs(9, 1, 3) == 1 + 2 / 3 + 6 / 9  # rungs 1 and 3 (9 is max_t - 1)
    assert asha_epochs(3, 5, 2) == 3  # the grace period outlasts the stage: nothing is cut


def test_the_schedule_shares_a_base_and_waits_for_its_trainer():
    # two slots: A trains base k (10 s) then 5 s; B needs k too, so waits until 10, then 5 s;
    # C starts when the first slot frees (15) and runs 4 s
    jobs = [Job("k", 10.0, 5.0), Job("k", 10.0, 5.0), Job(None, 0.0, 4.0)]
    ready: dict[str, float] = {}
    assert schedule(jobs, 2, ready) == (19.0, 15.0 + 15.0 + 4.0)
    assert ready == {"k": 10.0}
    # a base already in the cache costs nothing; one slot runs the jobs one after the other
    assert schedule(jobs, 1, {"k": 0.0}) == (14.0, 14.0)


def test_a_line_through_the_calibrated_points():
    assert _line([(1.0, 2.0), (3.0, 6.0)])(2.0) == pytest.approx(4.0)
    assert _line([(1.0, 6.0), (3.0, 2.0)])(2.0) == 4.0  # more FLOPs never cost less: the mean
    assert _line([(5.0, 1.0), (5.0, 3.0)])(100.0) == 2.0  # one distinct x: the mean


# -- a real calibration -----------------------------------------------------------------------


def test_calibration_times_every_stage_of_the_cheapest_and_dearest_points(cache):
    spec = parse_study(STUDY, "planned.yaml")
    dataset = str(dataset_path(spec.train))
    space = SearchSpace(spec)
    configs = [spec.train.with_overrides(**space.overrides(p), **{"data.path": dataset})
               for p in space.points()]
    points = corners(spec, configs)
    briefs = sorted((c.model.moe.has_experts, c.model.moe.experts, list(c.model.backbone.mlp))
                    for c in points)
    # the cheapest overall is dense [8]; the dearest, and the dearest with experts, K=8 [16];
    # the cheapest with experts K=2 [8]
    assert briefs == [(False, 4, [8]), (True, 2, [8]), (True, 8, [16])]
    cal = calibrate(points, steps=20)
    stages = sorted((m.point, m.stage) for m in cal.train)
    # a base is timed once per distinct base model: dense [8] stands for K=2 [8]'s
    assert stages == sorted([("dense mlp=[8]", "base"), ("hilomoe L=2 K=8 r=1 mlp=[16]", "base"),
                             *[(f"hilomoe L=2 K={k} r=1 mlp={m}", s) for k, m in
                               ((2, [8]), (8, [16])) for s in ("experts", "joint")]])
    assert all(m.step_s > 0 and m.flops > 0 for m in cal.train) and cal.seconds > 0

    plan = predict(spec, dataset, cal, str(cache), draws=4)
    by_phase = {p.phase: p for p in plan.phases}
    # the driver's counts: every distinct point up to the budget; the train-size grid but its
    # centre (the whole split); the baseline and one HiLoMoE point at two more seeds each
    assert by_phase["search"].trials == 5
    assert by_phase["design"].trials == 5
    assert by_phase["repeats"].trials == 2 * 2
    assert plan.wall_s >= sum(p.wall_s for p in plan.phases)
    assert plan.wall_range_s[0] <= plan.wall_s <= plan.wall_range_s[1]
    assert plan.cpu_hours == pytest.approx(sum(p.trial_s for p in plan.phases) / 3600)
    assert plan.gpu_hours == 0.0

    # one slot at a time takes at least as long, and costs the same slot-seconds
    serial = predict(spec.model_copy(update={"budget": spec.budget.model_copy(
        update={"concurrency": 1})}), dataset, cal, str(cache), draws=4)
    assert serial.wall_s >= plan.wall_s
    # twice the step time: every trial's training time doubles
    slower = Calibration([Measure(m.point, m.stage, m.batch, m.flops, 2 * m.step_s)
                          for m in cal.train], cal.eval, cal.save, cal.device, cal.threads,
                         cal.seconds)
    cfg = spec.train.with_overrides(**{"data.path": dataset})
    fast, slow = (Costing(spec, dataset, c, None) for c in (cal, slower))
    for stage in ("base", "experts", "joint"):
        from hilomoe.config import StageName

        s = StageName(stage)
        rows = fast.rows["train"]
        steps = math.ceil(rows / cfg.stages.get(s).batch_size)
        extra = (steps * cal.step_s(stage, cfg.stages.get(s).batch_size, fast_flops(fast, cfg, s))
                 * cfg.stages.get(s).epochs * fast.slowdown)
        assert slow.stage_s(cfg, s, asha=False) - fast.stage_s(cfg, s, asha=False) == \
            pytest.approx(extra)


def fast_flops(costing: Costing, cfg, stage) -> float:
    from hilomoe.study.calibrate import stage_flops as _stage_flops

    return _stage_flops(costing.schema, cfg, stage)


def test_a_continuous_space_is_planned_from_random_draws(cache):
    """No finite list of points: the corners come from random draws (a choice of lists, drawn
    by index, next to a log-scale range)."""
    from hilomoe.study.plan import plan_study

    raw = {**STUDY, "space": {**STUDY["space"],
                              "stages.base.lr": {"float": [0.001, 0.01], "log": True}}}
    spec = parse_study(raw, "planned.yaml")
    assert SearchSpace(spec).points() is None
    plan = plan_study(spec, dataset_path(spec.train), str(cache), steps=10, draws=2)
    points = {m.point for m in plan.calibration.train}
    assert "dense mlp=[8]" in points and "hilomoe L=2 K=8 r=1 mlp=[16]" in points
    assert plan.phases[0].trials == 5 and plan.wall_s > 0


def test_a_base_already_in_the_stage_1_cache_costs_nothing(cache):
    from hilomoe.study.cache import Stage1Cache
    from hilomoe.study.trial import trial_device

    spec = parse_study(STUDY, "planned.yaml")
    dataset = str(dataset_path(spec.train))
    cfg = spec.train.with_overrides(**{"data.path": dataset})
    cal = calibrate([cfg], steps=10)
    costing = Costing(spec, dataset, cal, str(cache))
    before = costing.job(cfg, asha=False)
    assert before.base_s > 0
    (cache / "stage1" / Stage1Cache.key(cfg, dataset, trial_device(spec))).mkdir(parents=True)
    after = costing.job(cfg, asha=False)
    assert (after.base_key, after.base_s, after.rest_s) == (before.base_key, 0.0, before.rest_s)


# -- the command ------------------------------------------------------------------------------


def test_study_plan_prints_the_plan_and_its_json(tmp_path, cache):
    import yaml

    study = tmp_path / "planned.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    plan = one_json(hilomoe("study", "plan", str(study), "--steps", "10", "--json").stdout)
    assert {"wall_s", "wall_range_s", "cpu_hours", "gpu_hours", "phases", "calibration",
            "assumptions"} <= plan.keys()
    assert [p["phase"] for p in plan["phases"]] == ["search", "design", "repeats"]
    assert plan["wall_s"] > 0 and plan["calibration"]["train"]
    text = hilomoe("study", "plan", str(study), "--steps", "10", "--concurrency", "1").stdout
    assert "plan: about" in text and "1 at a time" in text and "calibration" in text
    bad = hilomoe("study", "plan", str(study), "--steps", "0", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--steps" in bad.stderr
    missing = hilomoe("study", "plan", str(Path(tmp_path / "nope.yaml")), check=False)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
