"""Scaling-law designs: the grid points a study trains after its search (no Ray, no training)."""

from __future__ import annotations

import pytest

from hilomoe.config import ConfigError
from hilomoe.study.design import DEFAULTS, MIN_VALUES, LawDesign, design_points
from hilomoe.study.space import FIXED, config_key
from hilomoe.study.spec import parse_study

TRAIN = {"model": {"embedding_dim": 4, "backbone": {"mlp": [16, 8], "cross_layers": 1},
                   "moe": {"levels": 2, "experts": 4, "top_k": 2}}}


def study(**extra) -> dict:
    return {"name": "t", "train": TRAIN,
            "space": {"model.moe.variant": {"choice": ["dense", "hilomoe"]},
                      "model.moe.experts": {"choice": [4, 8]}}, **extra}


def rec(tid, variant, auc, **params) -> dict:
    return {"trial_id": tid, "status": "completed", "variant": variant, "valid_auc": auc,
            "flops": 100.0, "params": {"model.moe.variant": variant, **params}}


RECORDS = [rec("d", "dense", 0.80), rec("h4", "hilomoe", 0.78, **{"model.moe.experts": 4}),
           rec("h8", "hilomoe", 0.79, **{"model.moe.experts": 8})]


def test_each_axis_gets_its_grid_around_the_best_hilomoe_trial():
    spec = parse_study(study(laws={"axes": ["experts", "mlp_width", "train_size"]}))
    points = design_points(spec.laws, spec.train, RECORDS)
    by_axis = {}
    for p in points:
        by_axis.setdefault(p["design_axis"], []).append(p[FIXED])
    assert set(by_axis) == {"experts", "mlp_width", "train_size"}
    for axis, settings in by_axis.items():
        # the center's own value is the sixth point: trained already, not again
        assert len(settings) + 1 == len(DEFAULTS[axis]) >= MIN_VALUES
        # around the best HiLoMoE trial (h8; the dense one has the better AUC but no experts)
        assert all(s["model.moe.variant"] == "hilomoe" for s in settings)
        configs = {config_key(spec.train.with_overrides(**s)) for s in settings}
        assert len(configs) == len(settings)  # distinct trainings
    assert [s["model.moe.experts"] for s in by_axis["experts"]] == [2, 4, 16, 32, 64]
    assert by_axis["mlp_width"][0]["model.backbone.mlp"] == [4, 2]  # 16 x 0.25, 8 x 0.25
    assert by_axis["mlp_width"][-1]["model.backbone.mlp"] == [128, 64]
    assert all(s["model.moe.experts"] == 8 for s in by_axis["train_size"])
    assert [s["data.train_fraction"] for s in by_axis["train_size"]][-1] == 0.5

    # a resumed study does not train a grid point again
    done = RECORDS + [{**rec("g", "hilomoe", 0.7, **by_axis["experts"][0]),
                       "design_axis": "experts"}]
    again = design_points(spec.laws, spec.train, done)
    assert len(again) == len(points) - 1


def test_no_design_no_points_and_no_center_no_points():
    spec = parse_study(study())
    assert design_points(spec.laws, spec.train, RECORDS) == []
    spec = parse_study(study(laws={"axes": ["levels"]}))
    assert design_points(spec.laws, spec.train, []) == []


@pytest.mark.parametrize("laws, fragment", [
    ({"axes": ["width"]}, "laws.axes.0: Input should be 'experts', 'levels', 'rank', "
                          "'mlp_width' or 'train_size'"),
    ({"axes": ["experts"], "values": {"experts": [2, 4, 8]}},
     "a law needs at least 6 distinct values, got 3"),
    ({"axes": ["rank"], "values": {"experts": [2, 4, 8, 16, 32, 64]}},
     "values.experts: experts is not one of the declared axes"),
    ({"axes": ["train_size"], "values": {"train_size": [0.1, 0.2, 0.3, 0.4, 0.5, 2]}},
     "positive fractions at most 1"),
    # top_k 2 needs at least 2 experts per level
    ({"axes": ["experts"], "values": {"experts": [1, 2, 3, 4, 5, 6]}},
     "laws: experts = 1 is not a valid training configuration (model.moe: top_k (2) must be "
     "at most experts (1))"),
])
def test_bad_designs_are_refused_naming_the_key(laws, fragment):
    with pytest.raises(ConfigError) as err:
        parse_study(study(laws=laws), "s.yaml")
    assert fragment in str(err.value) and str(err.value).startswith("s.yaml: ")
    assert "\n" not in str(err.value)


def test_a_design_validates_as_a_model():
    assert LawDesign(axes=["rank"]).grid("rank") == [1, 2, 4, 8, 16, 32]
