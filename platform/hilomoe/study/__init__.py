"""Studies: a search over HiLoMoE settings (Ray Tune + Optuna), tracked in MLflow, ending in
scaling-law and Pareto reports. `spec.py` is the study file's typed schema."""

from hilomoe.study.spec import StudySpec, load_study

__all__ = ["StudySpec", "load_study"]
