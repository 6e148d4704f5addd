"""The Ray-free parts of a study: search space, stage-1 cache, records, overhead arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from hilomoe.bench.study import measure
from helpers import on_dataset, planted_dataset
from hilomoe.config import StageName
from hilomoe.data.synth import write_synth
from hilomoe.engine.local import build_model, parquet_sources
from hilomoe.engine.loop import Engine, run_stages
from hilomoe.study.cache import Stage1Cache, Stage1Entry, TrialCache
from hilomoe.tracking.records import best_record, trial_record
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import parse_study
from hilomoe.study.trial import trial_cost

TRAIN = {
    "data": {"synth": {"rows": 3000, "categorical_fields": 4, "vocab_size": 10,
                       "numeric_fields": 1, "depth": 2, "branching": 3}},
    "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
              "moe": {"levels": 2, "experts": 4, "top_k": 2}},
    "stages": {"base": {"epochs": 3}, "experts": {"epochs": 2}, "joint": {"epochs": 2}},
}


def study(space: dict, **extra) -> dict:
    return {"name": "t", "train": TRAIN, "space": space, **extra}


# -- search space ---------------------------------------------------------------------------


def draw(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    """`n` points drawn through Optuna's define-by-run interface, as Tune's OptunaSearch does."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(space.sample(trial))
        study.tell(trial, 0.5)
    return points


def test_draws_land_inside_the_declared_bounds():
    spec = parse_study(study({
        "model.moe.experts": {"choice": [2, 4]},
        "model.moe.levels": {"int": [1, 3]},
        "stages.joint.lr": {"float": [1e-4, 1e-2], "log": True},
        "model.moe.rank": {"int": [2, 8], "step": 2},
        "stages.experts.lr": {"float": [1e-4, 1e-2], "log": True, "step": 1e-4},
    }))
    points = draw(SearchSpace(spec), 200)
    for p in points:
        assert p["model.moe.experts"] in (2, 4)
        assert 1 <= p["model.moe.levels"] <= 3  # the high bound is inclusive
        assert 1e-4 <= p["stages.joint.lr"] <= 1e-2
        assert p["model.moe.rank"] in (2, 4, 6, 8)
        steps = p["stages.experts.lr"] / 1e-4  # log scale and a step: rounded to the step
        assert 1e-4 <= p["stages.experts.lr"] <= 1e-2 and abs(steps - round(steps)) < 1e-6
    assert {p["model.moe.levels"] for p in points} == {1, 2, 3}


QUICK_SPACE = {"model.moe.experts": {"choice": [4, 8, 16]},
               "model.moe.levels": {"int": [1, 3]},
               "model.moe.variant": {"choice": ["dense", "hilomoe"]},
               "model.backbone.mlp": {"choice": [[16], [32]]},
               "stages.joint.lr": {"choice": [1e-3, 3e-3]}}


def test_a_dense_point_never_draws_a_moe_or_later_stage_setting():
    space = SearchSpace(parse_study(study(QUICK_SPACE)))
    assert space.keys[:2] == ["model.moe.variant", "model.moe.levels"]  # the gates first
    points = draw(space, 100)
    dense = [p for p in points if p["model.moe.variant"] == "dense"]
    moe = [p for p in points if p["model.moe.variant"] == "hilomoe"]
    assert len(dense) > 20 and len(moe) > 20
    for p in dense:  # only the backbone: the experts and joint stages never run
        assert set(p) == {"model.moe.variant", "model.backbone.mlp"}
    for p in moe:
        assert set(p) == set(QUICK_SPACE)


def test_levels_zero_switches_the_other_moe_settings_off():
    space = SearchSpace(parse_study(study({"model.moe.levels": {"choice": [0, 2]},
                                           "model.moe.experts": {"choice": [2, 4]}})))
    for p in draw(space, 40):
        assert ("model.moe.experts" in p) == (p["model.moe.levels"] == 2)


def test_points_that_train_the_same_model_are_one_point():
    space = SearchSpace(parse_study(study(QUICK_SPACE)))
    points = space.points()
    # dense: 2 widths; hilomoe: 3 K x 3 L x 2 widths x 2 joint lr
    assert len(points) == 2 + 3 * 3 * 2 * 2
    assert len({space.key(p) for p in points}) == len(points)
    a = {"model.moe.variant": "dense", "model.backbone.mlp": 0}  # a choice of lists: its index
    assert space.key({**a, "model.moe.experts": 4}) == space.key({**a, "model.moe.experts": 16})
    h = {"model.moe.variant": "hilomoe", "model.moe.levels": 2, "model.backbone.mlp": 0}
    assert space.key({**h, "model.moe.experts": 4}) != space.key({**h, "model.moe.experts": 16})
    # a continuous range: no count
    assert SearchSpace(parse_study(study({"stages.joint.lr": {"float": [1e-3, 1e-2]}}))
                       ).points() is None


def test_the_searcher_hands_out_each_distinct_point_once_then_finishes():
    """The Tune searcher over a small space, driven as Tune drives it: TPE proposes repeats,
    the searcher tells Optuna the first trial's outcome for them and draws again."""
    from ray.tune.search import Searcher

    from hilomoe.study.search import make_searcher, trials_to_run

    spec = parse_study(study({"model.moe.variant": {"choice": ["dense", "hilomoe", "flat"]},
                              "model.moe.experts": {"choice": [2, 4]}},
                             budget={"trials": 12}))
    space = SearchSpace(spec)
    assert trials_to_run(spec, space) == 5  # dense once, hilomoe and flat twice each
    searcher = make_searcher(spec, space)
    keys, ids = set(), []
    for i in range(12):
        params = searcher.suggest(f"t{i}")
        if params == Searcher.FINISHED:
            break
        assert space.key(params) not in keys
        keys.add(space.key(params))
        ids.append(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"valid_auc": 0.5 + 0.01 * i})
    assert len(ids) == 5
    from optuna.trial import TrialState

    told = searcher._ot_study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in told)  # repeats learned the outcome
    assert len(told) >= 5


def test_a_repeat_of_a_running_trial_learns_its_outcome_when_it_ends():
    import optuna

    from hilomoe.study.search import MAX_DRAWS, DistinctSearch

    spec = parse_study(study({"model.moe.variant": {"choice": ["dense"]},
                              "seed": {"choice": [0, 1]}}))
    # no count of the distinct points (as for a continuous space): the searcher finds the space
    # spent by drawing only repeats
    searcher = DistinctSearch(SearchSpace(spec), None, metric="valid_auc", mode="max",
                              sampler=optuna.samplers.RandomSampler(seed=0))
    a = searcher.suggest("a")
    b = searcher.suggest("b")  # both running: the two seeds, whatever the sampler repeated
    assert {a["seed"], b["seed"]} == {0, 1}
    assert searcher.suggest("c") == "FINISHED"
    waiting = [t for ts in searcher._twins.values() for t in ts]
    assert len(waiting) >= MAX_DRAWS
    searcher.on_trial_complete("a", {"valid_auc": 0.7})
    searcher.on_trial_complete("b", {"valid_auc": 0.6})
    values = {t.number: t.value for t in searcher._ot_study.get_trials(deepcopy=False)}
    assert all(values[t.number] in (0.7, 0.6) for t in waiting)


def test_a_choice_of_mappings_is_sampled_by_index_and_merged_into_its_setting():
    recipes = [{}, {"base": {"enabled": False}, "experts": {"enabled": False},
                    "joint": {"epochs": 7}}]
    spec = parse_study(study({"stages": {"choice": recipes}, "seed": {"choice": [0, 1]}},
                             sampler="grid"))
    space = SearchSpace(spec)
    assert space.grid() == {"stages": [0, 1], "seed": [0, 1]}
    assert len(space.points()) == 4
    joint_only = spec.train.with_overrides(**space.overrides({"stages": 1, "seed": 1}))
    assert not joint_only.stages.base.enabled and not joint_only.stages.experts.enabled
    assert joint_only.stages.joint.epochs == 7
    # merged, not replaced: the joint stage keeps the recipe's other settings
    assert joint_only.stages.joint.base_lr_mult == spec.train.stages.joint.base_lr_mult
    assert joint_only.seed == 1
    three = spec.train.with_overrides(**space.overrides({"stages": 0, "seed": 0}))
    assert three.stages == spec.train.stages


def test_grid_sampling_needs_choices():
    from hilomoe.config import ConfigError

    with pytest.raises(ConfigError, match="sampler grid needs choice domains; space"):
        parse_study(study({"model.moe.levels": {"int": [1, 3]}}, sampler="grid"))


def test_labels_are_short_and_unique():
    spec = parse_study(study({"stages.base.lr": {"float": [1e-3, 1e-2]},
                              "stages.joint.lr": {"float": [1e-3, 1e-2]},
                              "model.moe.experts": {"choice": [2, 4]}}))
    assert SearchSpace(spec).labels() == {"stages.base.lr": "lr", "stages.joint.lr": "joint.lr",
                                          "model.moe.experts": "experts"}


# -- stage-1 cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return planted_dataset(tmp_path_factory, TRAIN)


def cfg_with(dataset, **overrides):
    return on_dataset(TRAIN, dataset, **overrides)


def test_the_cache_key_depends_on_the_base_and_not_on_the_experts(dataset):
    def key(cfg, dataset):
        return Stage1Cache.key(cfg, dataset, "cpu")

    base = key(cfg_with(dataset), dataset)
    assert key(cfg_with(dataset, **{"model.moe.experts": 2, "model.moe.levels": 3,
                                    "model.moe.variant": "flat", "stages.joint.lr": 0.1,
                                    "stages.experts.epochs": 9}), dataset) == base
    assert key(cfg_with(dataset, **{"model.moe.variant": "dense"}), dataset) == base
    for change in ({"seed": 1}, {"model.embedding_dim": 8}, {"model.backbone.mlp": [16]},
                   {"stages.base.lr": 0.01}, {"stages.base.epochs": 4}):
        assert key(cfg_with(dataset, **change), dataset) != base, change


def test_the_cache_key_follows_the_data_content_not_file_times(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    before = Stage1Cache.key(cfg_with(copy), copy, "cpu")
    assert Stage1Cache.key(cfg_with(dataset), dataset, "cpu") == before  # same content
    shard = next((copy / "train").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes())  # same bytes, new modification time
    assert Stage1Cache.key(cfg_with(copy), copy, "cpu") == before
    meta = json.loads((copy / "dataset.json").read_text())
    meta["content_hash"] = "sha256:" + "0" * 64  # other rows: another content hash
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert Stage1Cache.key(cfg_with(copy), copy, "cpu") != before


def test_a_trial_key_is_the_whole_configuration_but_not_how_it_ran(dataset, tmp_path):
    def key(cfg, dataset):
        return TrialCache.key(cfg, dataset, "cpu")

    base = key(cfg_with(dataset), dataset)
    assert key(cfg_with(dataset, **{"ray.workers": 2, "ray.max_failures": 0}), dataset) == base
    for change in ({"model.moe.experts": 2}, {"stages.joint.lr": 0.01}, {"seed": 3}):
        assert key(cfg_with(dataset, **change), dataset) != base, change
    cache = TrialCache(tmp_path)
    cache.put(base, {"model": {"w": torch.ones(1)}}, {"seconds": 2.0})
    state, summary = cache.get(base)
    assert torch.equal(state["model"]["w"], torch.ones(1)) and summary == {"seconds": 2.0}


def test_every_shipped_study_file_is_valid():
    from pathlib import Path

    from hilomoe.study.spec import load_study

    files = sorted(Path(__file__).parents[1].joinpath("studies").glob("*.yaml"))
    names = {load_study(f).name for f in files if f.name != "train_example.yaml"}
    assert names == {"quickstart", "expert_scaling", "depth_scaling", "rank_ablation",
                     "routing_ablation", "stage_ablation", "paper_replication", "smoke",
                     "criteo_like", "data_scaling"}


def _engine(cfg):
    return Engine(build_model(cfg, engine_dataset(cfg).schema), cfg.stages,
                  keep_stage_models=True)


def test_every_variant_trains_the_same_stage_1_as_the_dense_baseline(dataset):
    """What makes sharing exact: stage 1 of any MoE variant equals the non-MoE model's, bit for
    bit (seeded base initialisation independent of the experts, experts off in stage 1)."""
    results = {}
    for variant in ("dense", "hilomoe", "flat", "sequential", "dense_experts"):
        cfg = cfg_with(dataset, **{"model.moe.variant": variant})
        engine = _engine(cfg)
        src = parquet_sources(engine_dataset(cfg), cfg)
        records = list(engine.fit_stage(StageName.BASE, src["train"], src["valid"]))
        results[variant] = (engine.model.base_state(), [r.valid["auc"] for r in records])
    dense_state, dense_aucs = results.pop("dense")
    for variant, (state, aucs) in results.items():
        assert aucs == dense_aucs, variant
        assert state.keys() == dense_state.keys(), variant
        assert all(torch.equal(state[k], dense_state[k]) for k in state), variant


def engine_dataset(cfg):
    from hilomoe.data.dataset import open_dataset

    return open_dataset(cfg.data.path)


@pytest.mark.parametrize("backend", ["torchrec", "torch"])
def test_a_trial_that_adopts_a_cached_stage_1_ends_where_training_it_would(dataset, tmp_path,
                                                                          backend):
    """The cache round trip (put, get, adopt) changes nothing: same final weights, same test
    metrics, same epoch records as a trial that trained all three stages itself (TorchRec's
    fused tables included: the entry holds their weights in the common layout)."""
    cfg = cfg_with(dataset, **{"model.embedding.backend": backend})
    src = parquet_sources(engine_dataset(cfg), cfg)
    full = _engine(cfg)
    full_result = run_stages(full, src["train"], src["valid"], src["test"])

    donor = _engine(cfg_with(dataset, **{"model.moe.experts": 2,
                                          "model.embedding.backend": backend}))
    list(donor.fit_stage(StageName.BASE, src["train"], src["valid"]))
    cache = Stage1Cache(tmp_path / "cache")
    key = cache.key(cfg, dataset, "cpu")
    cache.put(key, Stage1Entry(donor.model.base_state(), list(donor.history), 1.5))
    entry = cache.get(key)
    assert entry.seconds == 1.5 and len(entry.history) == len(donor.history)

    adopter = _engine(cfg)
    adopter.adopt_stage(StageName.BASE, entry.weights, entry.history)
    result = run_stages(adopter, src["train"], src["valid"], src["test"])
    a, b = full.model.state_dict(), adopter.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result["test"] == full_result["test"]
    assert [(r.stage, r.epoch, r.valid["auc"]) for r in adopter.history] == \
           [(r.stage, r.epoch, r.valid["auc"]) for r in full.history]


def test_adopting_needs_a_fresh_engine(dataset):
    cfg = cfg_with(dataset)
    engine = _engine(cfg)
    engine.adopt_stage(StageName.BASE, engine.model.base_state(), [])
    with pytest.raises(RuntimeError, match="fresh engine"):
        engine.adopt_stage(StageName.BASE, engine.model.base_state(), [])


def test_a_second_put_of_the_same_key_keeps_the_first(tmp_path):
    cache = Stage1Cache(tmp_path)
    cache.put("k", Stage1Entry({"w": torch.ones(2)}, [], 1.0))
    cache.put("k", Stage1Entry({"w": torch.zeros(2)}, [], 2.0))
    entry = cache.get("k")
    assert torch.equal(entry.weights["w"], torch.ones(2)) and entry.seconds == 1.0
    assert cache.get("other") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


# -- records and the overhead arithmetic ------------------------------------------------------


def test_records_say_completed_pruned_or_failed(dataset):
    cfg = cfg_with(dataset)
    schema = engine_dataset(cfg).schema
    epoch = {"stage": "joint", "epoch": 1, "valid_auc": 0.7, "elapsed_s": 3.0}
    final = {"final": True, "valid_auc": 0.71, "test_auc": 0.72, "train_seconds": 4.0,
             "stage1_reused": True, "stage1_seconds": 2.0}
    cost = trial_cost(cfg, schema)
    done = trial_record("a", {}, cfg, cost, [epoch, final], "done", None, 1000)
    assert done["status"] == "completed" and done["test_auc"] == 0.72 and done["epochs"] == 1
    assert done["stage1_reused"] and done["train_seconds"] == 4.0 and done["flops"] > 0
    cut = trial_record("b", {}, cfg, cost, [epoch], "done", None, 1000)
    assert cut["status"] == "pruned" and cut["test_auc"] is None and cut["valid_auc"] == 0.7
    assert trial_record("c", {}, cfg, cost, [epoch], "failed", None, 1000)["status"] == "failed"
    spec = parse_study(study({}))
    assert best_record(spec, [cut, done])["trial_id"] == "a"


def test_an_undefined_metric_is_never_the_best_record():
    """max() and min() keep a NaN that comes first and skip one that comes later: it must not
    win either way, whatever the objective's direction."""
    nan = float("nan")
    for metric, mode, good in (("valid_auc", "max", 0.7), ("valid_logloss", "min", 0.4)):
        spec = parse_study(study({}, objectives=[{"metric": metric, "mode": mode}]))
        rows = [{"trial_id": "nan", "status": "completed", metric: nan},
                {"trial_id": "good", "status": "completed", metric: good},
                {"trial_id": "null", "status": "completed", metric: None}]
        assert best_record(spec, rows)["trial_id"] == "good"
        assert best_record(spec, rows[::-1])["trial_id"] == "good"
        assert best_record(spec, [rows[0]]) is None


def test_overhead_is_the_share_of_slot_time_not_spent_training():
    events = [{"kind": "trial_start", "trial_id": "a", "time": 12.0},
              {"kind": "trial_start", "trial_id": "b", "time": 12.0},
              {"kind": "trial_end", "trial_id": "a", "time": 42.0},
              {"kind": "trial_end", "trial_id": "b", "time": 32.0}]
    summary = {"trials": [{"train_seconds": 27.0}, {"train_seconds": 18.0}],
               "stage1_reused": 1, "stage1_saved_s": 5.0, "best": None}
    m = measure(summary, events, t0=10.0, t1=50.0, concurrency=2)
    assert m["slots"] == 2 and m["wall_s"] == 40.0 and m["train_s"] == 45.0
    assert m["overhead_fraction"] == pytest.approx(1 - 45 / 80)
    assert m["startup_s"] == 2.0 and m["tail_s"] == 8.0
    assert m["trial_overhead_s"] == pytest.approx((30 + 20) - 45)  # trial wall - training
    assert m["idle_slot_s"] == pytest.approx(80 - 50)  # slot-seconds with no trial
    assert m["plan_s"] == 0.0 and m["planned_wall_s"] is None and m["plan_error"] is None
    assert json.dumps(m)
    # the plan's calibration (the first 2 s here) is not part of the study it predicts
    planned = {**summary, "plan": {"calibration_s": 2.0, "wall_s": {"predicted": 57.0}}}
    m = measure(planned, events, t0=8.0, t1=50.0, concurrency=2)
    assert m["wall_s"] == 40.0 and m["startup_s"] == 2.0 and m["plan_s"] == 2.0
    assert m["planned_wall_s"] == 57.0 and m["plan_error"] == pytest.approx(17 / 40)


# -- resume pins its data ----------------------------------------------------------------------


def test_resume_refuses_changed_data_and_allows_a_new_pace(tmp_path, monkeypatch):
    """A study or run resumed on regenerated data would mix two datasets: refused in one
    sentence. Only the pace (concurrency, time limit) may change on resume."""
    from hilomoe.config import PlantedData
    from hilomoe.errors import DatasetError, HilomoeError
    from hilomoe.study.driver import _open_run
    from hilomoe.study.run_dir import StudyRun
    from hilomoe.distributed.driver import TrainRun

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / "ds"
    planted = PlantedData(rows=2000, categorical_fields=2, vocab_size=6, numeric_fields=1)
    write_synth(planted, data)
    raw = study({}, budget={"trials": 2, "concurrency": 1})
    raw["train"] = {**TRAIN, "data": {"path": str(data)}}
    spec = parse_study(raw)
    _open_run(spec, tmp_path / "st", resume=False, cache=False)
    run = TrainRun.create(spec.train, tmp_path / "run")
    assert run.dataset_hash

    faster = parse_study({**raw, "budget": {"trials": 2, "concurrency": 2, "time_limit_s": 60}})
    again = _open_run(faster, tmp_path / "st", resume=True, cache=False)
    assert again.study.budget.concurrency == 2 and again.study.budget.time_limit_s == 60
    assert StudyRun.load(tmp_path / "st").study.budget.concurrency == 2  # kept for later resumes
    more = parse_study({**raw, "budget": {"trials": 3, "concurrency": 1}})
    with pytest.raises(HilomoeError, match="the study file changed"):
        _open_run(more, tmp_path / "st", resume=True, cache=False)

    write_synth(planted.model_copy(update={"seed": 1}), data, overwrite=True)  # new data, same path
    for resume in (lambda: _open_run(faster, tmp_path / "st", resume=True, cache=False),
                   lambda: TrainRun.load(tmp_path / "run")):
        with pytest.raises(DatasetError) as err:
            resume()
        assert "the dataset changed since" in str(err.value) and "\n" not in str(err.value)


def test_only_errors_of_a_lost_process_or_node_count_as_lost_to_the_cluster():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError
    from ray.tune import TuneError

    from hilomoe.errors import HilomoeError
    from hilomoe.study.driver import lost_to_the_cluster

    assert lost_to_the_cluster(ActorUnavailableError("The actor abc is unavailable", None))
    assert lost_to_the_cluster(ActorDiedError())
    assert lost_to_the_cluster(NodeDiedError("node gone"))
    # Tune's text of an actor error it could not keep (no pickled exception)
    assert lost_to_the_cluster(TuneError("The actor e59d is unavailable: The actor is "
                                         "temporarily unavailable: RpcError"))
    assert not lost_to_the_cluster(HilomoeError("stages.base.lr: must be positive."))
    assert not lost_to_the_cluster(RuntimeError("CUDA out of memory"))
    assert not lost_to_the_cluster(None)


# -- the live trial table ---------------------------------------------------------------------


def test_the_trial_count_grows_with_each_phase_after_the_search(capsys):
    """`[done/total]`: the search's trials, then each later phase's added as it starts (the
    quickstart printed [17/8 done] before)."""
    from hilomoe.study.console import TrialTable

    table = TrialTable({"model.moe.experts": "experts"}, total=2)

    def trial(tid: str) -> None:
        table({"kind": "trial_start", "trial_id": tid, "params": {"model.moe.experts": 4}})
        table({"kind": "trial_end", "trial_id": tid,
               "record": {"status": "completed", "valid_auc": 0.7, "test_auc": 0.7,
                          "flops": 10.0}})

    trial("a"), trial("b")
    table({"kind": "phase", "trials": 3, "message": "scaling-law grids along train_size: 3 trials"})
    trial("c")
    table({"kind": "phase", "trials": 1, "message": "again with 2 seeds: 1 trials"})
    trial("d")
    ends = [ln.rsplit("[", 1)[1] for ln in capsys.readouterr().err.splitlines() if "done]" in ln]
    assert ends == ["1/2 done]", "2/2 done]", "3/5 done]", "4/6 done]"]
