"""The study file (`studies/*.yaml`): what to search, for which objectives, on what budget.

    name: expert_scaling
    train: {...}                 # a complete training configuration: the fixed settings
    space:                       # dotted key paths of the training configuration -> a domain
      model.moe.experts: {choice: [4, 8, 16, 32]}
      stages.joint.lr: {float: [1.0e-4, 1.0e-2], log: true}
    objectives: [{metric: valid_auc, mode: max}, {metric: flops, mode: min}]
    budget: {trials: 16, concurrency: 2, time_limit_s: 3600, workers_per_trial: 1}
    repeats: 3                   # seeds behind the verdict (report/verdict.py)
    laws: {axes: [experts, train_size]}   # a grid per axis after the search (study/design.py)
    scheduler: {type: asha, grace_epochs: 1, reduction_factor: 3}
    sampler: tpe                 # or grid (every combination of choices), random

Everything is checked when the file loads, before Ray starts: unknown keys, a search key that
names no setting of the training configuration, an empty choice list, a range whose bounds are
reversed, and every corner of the space (each choice, each bound) as a training configuration
of its own, so `top_k` choices above the smallest `experts` choice, or rank 0, are refused
naming the key path.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, model_validator

from hilomoe.config import (ConfigError, PlainName, Strict, TrainConfig, load_config,
                            parse_config)
from hilomoe.study.design import LawDesign, check_design


class Domain(Strict):
    """One searched setting: exactly one of `choice`, `int` or `float` ([low, high])."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    choice: list[Any] | None = None
    ints: tuple[int, int] | None = Field(None, alias="int")
    floats: tuple[float, float] | None = Field(None, alias="float")
    log: bool = False
    step: float | None = Field(None, gt=0, description="draw multiples of step from low "
                               "(an integer for an int range)")

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [k for k in ("choice", "ints", "floats") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, int, float")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one value")
        bounds = self.ints or self.floats
        if bounds is not None:
            lo, hi = bounds
            if lo > hi:
                raise ValueError(f"the range's low bound ({lo}) is above its high bound ({hi})")
            if self.ints is not None and self.step is not None:
                if self.step != int(self.step):
                    raise ValueError(f"an int range takes an integer step, got {self.step}")
            if self.log and lo <= 0:
                raise ValueError(f"a log range needs a positive low bound, got {lo}")
        return self

    def corners(self) -> list[Any]:
        """The values that bound the domain: every choice, or both ends of a range."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.ints or self.floats)


class Objective(Strict):
    metric: Literal["valid_auc", "valid_logloss", "flops", "params_active"]
    mode: Literal["max", "min"]


class Budget(Strict):
    trials: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    time_limit_s: float | None = Field(None, gt=0)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    repeated_points: int = Field(4, ge=1, description="HiLoMoE frontier points repeated with "
                                 "more seeds (the best by validation AUC), besides the baseline")


class Scheduler(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_epochs: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)


class StudySpec(Strict):
    name: PlainName = Field(description="the study's directory (runs/<name>) and MLflow experiment")
    description: str = ""
    train: TrainConfig
    space: dict[str, Domain] = Field(default_factory=dict)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="valid_auc", mode="max")], min_length=1,
        max_length=2)
    budget: Budget = Budget()
    scheduler: Scheduler = Scheduler()
    sampler: Literal["tpe", "grid", "random"] = Field(
        "tpe", description="tpe: Optuna's TPE (MOTPE for two objectives); grid: every "
        "combination of the choices once, in budget.trials trials at most; random")
    seed: int = 0
    laws: LawDesign = Field(default_factory=LawDesign, description="axes that must end with "
                            "a fitted scaling law: a grid along each after the search")
    repeats: int = Field(
        1, ge=1, description="training seeds behind the verdict: after the search, the best "
        "baseline and the HiLoMoE frontier train again with seeds seed+1 .. seed+repeats-1, and "
        "the headline gives the difference with a 95% interval (1: single runs, no interval)")

    @model_validator(mode="after")
    def _grid(self) -> StudySpec:
        if self.sampler == "grid":
            ranges = [k for k, d in self.space.items() if d.choice is None]
            if ranges:
                raise ValueError(f"sampler grid needs choice domains; space.{ranges[0]} is a "
                                 f"range (list its values with choice)")
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def _check_space(spec: StudySpec, source: str) -> None:
    """Every search key names a setting, and every corner of the space validates."""
    raw = spec.train.model_dump(mode="json")
    for key in spec.space:
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{source}: space.{key}: names no setting of the training "
                                  f"configuration (use a dotted key path such as "
                                  f"model.moe.experts).")
            node = node[part]
    keys = list(spec.space)
    for values in itertools.product(*(spec.space[k].corners() for k in keys)):
        try:
            spec.train.with_overrides(**dict(zip(keys, values)))
        except ConfigError as err:
            setting = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
            reason = str(err).splitlines()[0].removeprefix("command line: ")
            raise ConfigError(f"{source}: space: the combination {setting} is not a valid "
                              f"training configuration ({reason.rstrip('.')}).") from None


def parse_study(raw: Any, source: str = "study") -> StudySpec:
    spec = parse_config(raw, source, StudySpec)
    _check_space(spec, source)
    check_design(spec.laws, spec.train, source)
    return spec


def load_study(path: str | Path) -> StudySpec:
    try:
        spec = load_config(path, StudySpec)
    except ConfigError:
        raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        if isinstance(raw, dict) and "train" not in raw and set(raw) & set(TrainConfig.model_fields):
            raise ConfigError(f"{path}: a training configuration, not a study file; train it "
                              f"with `hilomoe train {path}`, or put it under `train:` in a study "
                              f"file with a name and a space (see studies/quickstart.yaml).") from None
        raise
    _check_space(spec, str(path))
    check_design(spec.laws, spec.train, str(path))
    return spec
