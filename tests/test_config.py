"""Configuration validation: bad input gets one clear sentence naming the key path."""

from __future__ import annotations

import pytest

from hilomoe.config import ConfigError, TrainConfig, load_config, parse_config


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.yaml")
    return str(err.value)


def test_example_config_is_valid():
    cfg = load_config("studies/train_example.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.moe.variant.value == "hilomoe"


@pytest.mark.parametrize("raw, fragments", [
    ({"model": {"moe": {"experts": 4, "top_k": 5}}}, ["model.moe", "top_k (5)", "experts (4)"]),
    ({"model": {"moe": {"rank": 0}}}, ["model.moe.rank", "greater than or equal to 1", "got 0"]),
    ({"model": {"moe": {"varient": "flat"}}}, ["model.moe.varient", "unknown key"]),
    ({"model": {"moe": {"variant": "deep"}}}, ["model.moe.variant", "'hilomoe'", "got 'deep'"]),
    ({"stages": {"joint": {"lr": "fast"}}}, ["stages.joint.lr", "got 'fast'"]),
    ({"model": {"moe": {"apply_to": []}}}, ["model.moe", "apply_to"]),
    ({"model": {"backbone": {"mlp": [], "cross_layers": 0}}}, ["model.backbone", "at least one"]),
    ({"model": {"moe": {"variant": "dense"}}, "stages": {"base": {"enabled": False}}},
     ["stages.base.enabled must be true"]),
    ([1, 2], ["top level must be a mapping"]),
])
def test_bad_values_name_their_key_path(raw, fragments):
    msg = error_of(raw)
    assert msg.startswith("cfg.yaml: ")
    for f in fragments:
        assert f in msg
    assert "Traceback" not in msg and "pydantic" not in msg.lower()


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")


def test_stage_overrides_keep_the_recipe_defaults():
    cfg = parse_config({"stages": {"joint": {"lr": 0.01}, "experts": {"aux": {"balance": 0.5}}}})
    assert cfg.stages.joint.lr == 0.01
    assert cfg.stages.joint.base_lr_mult == 0.1 and cfg.stages.joint.aux.z == 1e-3
    assert cfg.stages.experts.aux.balance == 0.5 and cfg.stages.experts.aux.diversity == 0.01
