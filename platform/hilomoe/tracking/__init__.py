"""MLflow tracking and trial records of a study; imports neither torch nor Ray.

- `retry.py`: a generic buffered-retry MLflow client (calls wait and replay while MLflow is down);
- `keys.py`: how a study appears in MLflow (tags, safe keys and values);
- `runs.py`: `Tracker`, the study run, trial runs, params, metrics and the logged model;
- `logged_model.py`: a torch model as an MLflow LoggedModel (torch imported when called);
- `read.py`: a study's records read back from MLflow, the saved views of a store;
- `records.py`: trial records in a study directory (build, save, load, best).
"""
