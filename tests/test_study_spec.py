"""Study files: validated once, before Ray starts, with messages that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hilomoe.config import ConfigError
from hilomoe.study.spec import load_study, parse_study

EXAMPLE = Path(__file__).resolve().parents[1] / "studies" / "train_example.yaml"
TRAIN = yaml.safe_load(EXAMPLE.read_text())


def study(**over) -> dict:
    return {"name": "s", "train": TRAIN, **over}


def test_a_complete_study_loads():
    spec = parse_study(study(
        space={"model.moe.experts": {"choice": [4, 8, 16]},
               "stages.joint.lr": {"float": [1e-4, 1e-2], "log": True},
               "model.moe.levels": {"int": [1, 4]}},
        objectives=[{"metric": "valid_auc", "mode": "max"}, {"metric": "flops", "mode": "min"}],
        budget={"trials": 6, "concurrency": 2}))
    assert spec.multi_objective and spec.space["model.moe.levels"].corners() == [1, 4]
    assert spec.space["stages.joint.lr"].floats == (1e-4, 1e-2)


@pytest.mark.parametrize("over, fragment", [
    ({"space": {"model.moe.expertz": {"choice": [4]}}},
     "space.model.moe.expertz: names no setting of the training configuration"),
    ({"space": {"model.moe.experts": {"choice": []}}}, "choice must list at least one value"),
    ({"space": {"model.moe.top_k": {"choice": [2, 8]}, "model.moe.experts": {"choice": [4, 8]}}},
     "model.moe.top_k=8, model.moe.experts=4 is not a valid training configuration"),
    ({"space": {"model.moe.rank": {"int": [0, 4]}}}, "model.moe.rank=0 is not a valid"),
    ({"space": {"stages.base.lr": {"float": [0.1, 0.01]}}}, "low bound (0.1) is above"),
    ({"space": {"model.moe.experts": {"choice": [4], "int": [1, 2]}}},
     "give exactly one of choice, int, float"),
    ({"budget": {"trials": 0}}, "budget.trials: Input should be greater than or equal to 1"),
    ({"objectives": []}, "objectives"),
    ({"repeats": 0}, "repeats: Input should be greater than or equal to 1"),
    ({"space": {"model.moe.levels": {"int": [1, 4], "step": 1.5}}},
     "an int range takes an integer step, got 1.5"),
    ({"schedulr": {}}, "schedulr: unknown key"),
])
def test_bad_studies_are_refused_naming_the_key(over, fragment):
    with pytest.raises(ConfigError) as err:
        parse_study(study(**over), "s.yaml")
    assert fragment in str(err.value) and str(err.value).startswith("s.yaml: ")


def test_load_study_reads_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study(space={"model.moe.experts": {"choice": [4, 8]}})))
    assert load_study(path).name == "s"


def test_a_training_configuration_given_as_a_study_is_named_as_such():
    example = Path(__file__).parents[1] / "studies" / "train_example.yaml"
    with pytest.raises(ConfigError, match="a training configuration, not a study file"):
        load_study(example)
