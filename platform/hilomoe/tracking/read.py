"""Reading a study back from MLflow: its trial records, and the saved views of a store.

    records, parent_run_id = load_records("my-study")    # trial.json of the latest study run
    views = study_views(uri, "http://127.0.0.1:5000")    # (experiment, URL) per study
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hilomoe.errors import HilomoeError
from hilomoe.tracking.keys import PARENT_TAG, ROLE_TAG, TRIAL_TAG, VIEW_TAG, view_url
from hilomoe.tracking.retry import reason, set_env_defaults, tracking_uri


def study_views(uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment, URL of its saved trials view in MLflow's UI at `base`) for every study the
    store at `uri` holds; none when it cannot be read (a store not created yet included)."""
    set_env_defaults()
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # asking would create an empty store
    try:
        found = MlflowClient(uri).search_experiments(max_results=1000)
    except Exception:
        return []
    return [(e.name, view_url(base, e.experiment_id)) for e in found if VIEW_TAG in e.tags]


def load_records(experiment: str, uri: str | None = None) -> tuple[list[dict], str | None]:
    """The trial records (`trial.json` of the child runs) of the latest study run of
    `experiment`, and that run's id, trials in the order they started."""
    set_env_defaults()
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise HilomoeError(f"MLflow at {uri} has no experiment named '{experiment}'.")
        parents = client.search_runs([found.experiment_id],
                                     filter_string=f"tags.`{ROLE_TAG}` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise HilomoeError(f"The MLflow experiment '{experiment}' at {uri} has no study runs.")
        parent = parents[0].info.run_id
        children = []
        token = None
        while True:
            page = client.search_runs([found.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
                                      order_by=["attributes.start_time ASC"], max_results=1000,
                                      page_token=token)
            children.extend(page)
            token = page.token
            if not token:
                break
        by_trial: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, run in enumerate(children):
                run_id = run.info.run_id
                if not any(f.path == "trial.json" for f in client.list_artifacts(run_id)):
                    continue
                local = client.download_artifacts(run_id, "trial.json", str(Path(tmp) / str(i)))
                record = json.loads(Path(local).read_text())
                by_trial[run.data.tags.get(TRIAL_TAG, run_id)] = record
        return list(by_trial.values()), parent
    except HilomoeError:
        raise
    except Exception as exc:
        raise HilomoeError(f"Could not read the study '{experiment}' from MLflow at {uri} "
                           f"({reason(exc)}).") from exc
