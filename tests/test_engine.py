"""The three-stage engine: what each stage trains, freezes and routes, and its checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import VARIANTS
from hilomoe.config import PlantedData, StageName, TrainConfig
from hilomoe.data.planted import generate_planted
from hilomoe.engine.local import Data, build_model, memory_sources
from hilomoe.session import checkpoint_score, train_local
from hilomoe.engine.history import EarlyStopping
from hilomoe.engine.loop import Engine
from hilomoe.model.routing import RoutingMode

SMALL = {
    "data": {"synth": {"rows": 3000, "categorical_fields": 4, "vocab_size": 20}},
    "model": {"embedding_dim": 4, "backbone": {"mlp": [16], "cross_layers": 1},
              "moe": {"levels": 2, "experts": 4, "top_k": 2}},
    "stages": {"base": {"epochs": 2, "lr": 0.01}, "experts": {"epochs": 2, "lr": 0.01},
               "joint": {"epochs": 2, "lr": 0.01}},
    "eval_batch_size": 512,
}


def small_config(**overrides) -> TrainConfig:
    raw = copy.deepcopy(SMALL)
    for key, value in overrides.items():
        node = raw
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def problem():
    return generate_planted(PlantedData.model_validate(SMALL["data"]["synth"]))


def make_engine(cfg, problem):
    return Engine(build_model(cfg, problem.schema), cfg.stages), memory_sources(problem, cfg)


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_stage_two_starts_exactly_at_stage_one(problem):
    cfg = small_config()
    engine, src = make_engine(cfg, problem)
    list(engine.fit_stage(StageName.BASE, src["train"], src["valid"]))
    before = engine.predict(src["valid"].epoch(0))
    engine.start_stage(StageName.EXPERTS)
    assert all(layer.mode is RoutingMode.DENSE for layer in engine.model.moe_layers())
    after = engine.predict(src["valid"].epoch(0))
    assert after.routing.summary()  # the experts are routing now ...
    assert (after.probs == before.probs).all()  # ... and the function is unchanged
    assert after.metrics()["logloss"] == before.metrics()["logloss"]


def test_each_stage_trains_and_freezes_what_the_recipe_says(problem):
    cfg = small_config()
    engine, src = make_engine(cfg, problem)
    model = engine.model
    base0, experts0 = snapshot(model.base_parameters()), snapshot(model.expert_parameters())

    list(engine.fit_stage(StageName.BASE, src["train"], src["valid"]))
    base1, experts1 = snapshot(model.base_parameters()), snapshot(model.expert_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(base0, base1))
    assert all(torch.equal(a, b) for a, b in zip(experts0, experts1))  # experts untouched

    list(engine.fit_stage(StageName.EXPERTS, src["train"], src["valid"]))
    base2, experts2 = snapshot(model.base_parameters()), snapshot(model.expert_parameters())
    assert all(torch.equal(a, b) for a, b in zip(base1, base2))  # base frozen
    assert any(not torch.equal(a, b) for a, b in zip(experts1, experts2))

    engine.start_stage(StageName.JOINT)
    assert all(layer.mode is RoutingMode.SPARSE for layer in model.moe_layers())
    lrs = sorted(g["lr"] for g in engine.optimizer.param_groups)
    assert lrs == pytest.approx([cfg.stages.joint.lr * cfg.stages.joint.base_lr_mult,
                                 cfg.stages.joint.lr])
    assert all(p.requires_grad for p in model.parameters())


def test_single_stage_joint_from_scratch_is_one_flag_away(problem):
    cfg = small_config(**{"stages.base.enabled": False, "stages.experts.enabled": False})
    engine, src = make_engine(cfg, problem)
    assert engine.plan() == [StageName.JOINT]
    engine.start_stage(StageName.JOINT)
    # no trained base to protect: every parameter trains at the stage's learning rate
    assert {g["lr"] for g in engine.optimizer.param_groups} == {cfg.stages.joint.lr}


def test_dense_variant_trains_in_the_base_stage_only(problem):
    cfg = small_config(**{"model.moe.variant": "dense"})
    engine, _ = make_engine(cfg, problem)
    assert engine.plan() == [StageName.BASE]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_through_its_stages(problem, variant):
    cfg = small_config(**{"model.moe.variant": variant.value})
    result = train_local(cfg, data=Data(problem.schema, memory_sources(problem, cfg)))
    expected = ["base"] if variant.value == "dense" else ["base", "experts", "joint"]
    assert list(result["stages"]) == expected
    for stage in result["stages"].values():
        assert 1 <= stage["epochs"] <= 2 and 0.5 < stage["auc"] <= 1.0
    assert 0.5 < result["test"]["auc"] <= 1.0
    losses = [h["train"]["loss"] for h in result["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    if variant.value != "dense":
        joint = [h for h in result["history"] if h["stage"] == "joint"]
        assert {"task", "balance", "z"} <= set(joint[0]["train"])
        assert joint[0]["valid"]["paths"] >= 1


def test_best_weights_are_restored_at_the_end_of_a_stage(problem):
    cfg = small_config(**{"stages.base.epochs": 4, "stages.base.lr": 0.05})
    engine, src = make_engine(cfg, problem)
    records = list(engine.fit_stage(StageName.BASE, src["train"], src["valid"]))
    best = max(r.valid["auc"] for r in records)
    assert engine.evaluate(src["valid"].epoch(0))["auc"] == pytest.approx(best, abs=1e-12)


def test_early_stopping():
    stop = EarlyStopping(patience=2)
    assert stop.update(0.7, 0) and not stop.should_stop
    assert not stop.update(0.69, 1) and not stop.should_stop
    assert not stop.update(0.70, 2) and stop.should_stop
    assert stop.best == 0.7 and stop.best_epoch == 0


def test_a_checkpoint_holds_nothing_twice_and_resumes_to_the_same_state(problem, tmp_path):
    """In stage 2 the tables are frozen: the base stage's kept weights and the model's are the
    same tensors, and so are the best weights after an improving epoch. The checkpoint stores
    each once, and loading it gives back every copy exactly."""
    from hilomoe.engine.loop import SAME_AS_MODEL

    cfg = small_config()
    engine = Engine(build_model(cfg, problem.schema), cfg.stages, keep_stage_models=True)
    src = memory_sources(problem, cfg)
    list(engine.fit_stage(StageName.BASE, src["train"], src["valid"]))
    engine.start_stage(StageName.EXPERTS)
    engine.train_epoch(src["train"].epoch(0))
    assert engine.end_epoch(0.6, 0)  # improved: best_state is the model's changing entries
    state = engine.state_dict()
    tables = [k for k in engine.model.state_dict() if k.startswith("embedding.")]
    assert tables and all(state["stage_models"]["base"][k] == SAME_AS_MODEL for k in tables)
    assert state["best_state"] and set(state["best_state"].values()) == {SAME_AS_MODEL}
    torch.save(state, tmp_path / "state.pt")
    whole = {**state, "best_state": engine.best_state, "stage_models": engine.stage_models}
    torch.save(whole, tmp_path / "whole.pt")
    assert (tmp_path / "state.pt").stat().st_size < (tmp_path / "whole.pt").stat().st_size

    other = Engine(build_model(cfg, problem.schema), cfg.stages, keep_stage_models=True)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for mine, theirs in [(engine.best_state, other.best_state),
                         *zip(engine.stage_models.values(), other.stage_models.values())]:
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    name = next(iter(other.best_state))  # copies: training on does not move the best weights
    assert other.best_state[name].data_ptr() != other.model.state_dict()[name].data_ptr()


def test_an_undefined_auc_never_becomes_the_best_epoch():
    """A NaN AUC (a one-class validation batch set) is not an improvement, and does not stop
    the epochs after it from improving (nothing compares greater than NaN)."""
    nan = float("nan")
    stop = EarlyStopping(patience=3)
    assert not stop.update(nan, 0) and stop.best_epoch == -1
    assert stop.update(0.6, 1) and stop.best == 0.6
    assert not stop.update(nan, 2) and stop.best == 0.6 and stop.best_epoch == 1
    assert stop.update(0.61, 3) and stop.best_epoch == 3
    assert not stop.update(nan, 4) and not stop.update(nan, 5) and not stop.should_stop
    assert not stop.update(nan, 6) and stop.should_stop  # NaN epochs count against patience
    assert checkpoint_score(1, nan) < checkpoint_score(1, 0.5)  # Ray keeps the defined ones


def test_checkpoint_resume_continues_bit_for_bit(problem):
    """Epoch 2 after a save/load equals epoch 2 of an uninterrupted run."""
    torch.set_num_threads(1)
    cfg = small_config()
    a, src = make_engine(cfg, problem)
    a.start_stage(StageName.JOINT)
    a.train_epoch(src["train"].epoch(0))
    state = copy.deepcopy(a.state_dict())
    a.train_epoch(src["train"].epoch(1))

    b, _ = make_engine(cfg, problem)
    b.load_state_dict(state)
    b.train_epoch(src["train"].epoch(1))
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def strict_json(text: str):
    """JSON as any strict reader parses it: the bare words NaN / Infinity are refused."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    return json.loads(text, parse_constant=refuse)


def test_undefined_metrics_are_written_as_null(tmp_path):
    """Every JSON writer goes through one helper: NaN and infinities become null (numpy's
    too), and anything it missed fails at once instead of writing invalid JSON."""
    import numpy as np

    from hilomoe import jsonio
    from hilomoe.session import write_files
    from hilomoe.tracking.records import write_json

    nan = float("nan")
    summary = {"stages": {"base": {"auc": nan, "best_epoch": -1}}, "test": {"auc": np.float32(nan),
               "logloss": np.float64(0.5)}, "history": [{"valid": {"auc": float("inf")}}],
               "path": tmp_path}
    expected = {"stages": {"base": {"auc": None, "best_epoch": -1}},
                "test": {"auc": None, "logloss": 0.5}, "history": [{"valid": {"auc": None}}],
                "path": str(tmp_path)}
    assert strict_json(jsonio.dumps(summary, default=str)) == expected
    write_json(tmp_path / "trials" / "t.json", summary)  # study records, results, plans
    assert strict_json((tmp_path / "trials" / "t.json").read_text()) == expected
    write_files({"summary.json": {"auc": nan}}, tmp_path)  # checkpoint summaries
    assert strict_json((tmp_path / "summary.json").read_text()) == {"auc": None}
    with pytest.raises(ValueError):  # a non-finite value the sanitiser cannot see
        jsonio.dumps({"x": object()}, default=lambda v: nan)
