"""What a study puts in MLflow besides its trials (study/callback.py logs those): the parent run
and the experiment's saved view of its trials, each trial's link for the report, and the best
trial's model, logged (and registered) as a plain-torch model.
"""

from __future__ import annotations

from pathlib import Path

from hilomoe.study.run_dir import StudyRun


def open_tracking(tracker, run: StudyRun) -> None:
    """The study's parent run, and the experiment's saved view of its trials: the searched
    settings, the objectives and cost, and how each trial ended, best first."""
    from hilomoe.study.callback import SOURCE_TAGS
    from hilomoe.tracking.keys import SEARCH_PREFIX, STATUS_TAG

    spec = run.study
    tracker.start_study(params={"study": spec.model_dump(mode="json", exclude_none=True)},
                        tags={**SOURCE_TAGS, "hilomoe.study": Path(run.study_dir).name},
                        run_id=run.parent_run_id)
    first = spec.objectives[0]
    metrics = list(dict.fromkeys([*(o.metric for o in spec.objectives), "valid_auc", "test_auc",
                                  "flops", "params_active", "train_seconds"]))
    tracker.set_view(["attributes.`Duration`", f"tags.`{STATUS_TAG}`",
                      *(f"params.`{SEARCH_PREFIX}{k}`" for k in spec.space),
                      *(f"metrics.`{m}`" for m in metrics)],
                     order_by=f"metrics.`{first.metric}`", ascending=first.mode == "min")


def run_links(tracker) -> dict[str, str]:
    """Each trial's MLflow run page, as a link from inside MLflow's UI (the report's frame)."""
    if tracker.experiment_id is None:
        return {}
    return {trial: f"/#/experiments/{tracker.experiment_id}/runs/{run_id}"
            for trial, run_id in tracker.run_ids.items()}


def ui_base(uri: str) -> str:
    """Where MLflow's UI for the store at `uri` is: the tracking server itself, or `hilomoe ui`
    on its default address for a local store."""
    return uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def log_best_model(run: StudyRun, tracker, best: dict, register: str | None) -> None:
    """The best trial's final weights as a plain-torch model: the tables in one nn.Embedding
    (the checkpoint layout is the same for every backend), so loading it needs no FBGEMM."""
    from hilomoe.data.dataset import open_dataset
    from hilomoe.engine.local import build_model
    from hilomoe.model.serving import ServingModel, serving_example
    from hilomoe.session import read_state
    from hilomoe.tracking.keys import SEARCH_PREFIX, TRIAL_TAG

    state, _ = read_state(best["checkpoint"])
    if state is None:
        return
    cfg = run.context().config_from(best["params"])
    cfg = cfg.with_overrides(**{"model.embedding.backend": "torch"})
    dataset = open_dataset(run.dataset)
    model = build_model(cfg, dataset.schema)
    model.load_state_dict(state["model"])
    metrics = {k: best.get(k) for k in ("valid_auc", "valid_logloss", "test_auc", "test_logloss",
                                        "flops", "params_total", "params_active")}
    example = serving_example(*dataset.head("valid", 5), dataset.field_names())
    tracker.log_model(ServingModel(model).eval(), input_example=example,
                      metrics=metrics, params={SEARCH_PREFIX + k: v
                                               for k, v in best["params"].items()},
                      tags={TRIAL_TAG: best["trial_id"],
                            "hilomoe.trial_run_id": tracker.run_ids.get(best["trial_id"], "")},
                      register=register)
