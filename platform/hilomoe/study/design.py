"""Scaling-law designs: after the search, a grid along each declared axis with everything else
fixed at the best HiLoMoE configuration found, so that every law has the points it needs.

    laws: {axes: [experts, train_size]}                    # in the study file
    todo = design_points(spec.laws, spec.train, records)  # Tune points not trained yet

A search spends its trials where the objective is best, which leaves an axis with two or three
distinct values and no law. A design fixes that by construction: `MIN_VALUES` distinct values
per axis, one factor at a time around the best point (Kaplan et al. 2020 vary one size at a
time the same way). The axes:

    experts     K, experts per level              model.moe.experts
    levels      L, levels of experts              model.moe.levels
    rank        r, LoRA rank                      model.moe.rank
    mlp_width   the MLP's widths, scaled          model.backbone.mlp (every layer times a factor)
    train_size  a fraction of the train split     data.train_fraction (nested subsets)

A design point is a trial like any other, with `design_axis` in its record. The best point
itself, at its own value, is not trained again: it is the grid's point at that value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hilomoe.config import ConfigError, Strict, TrainConfig
from hilomoe.report.fields import DESIGN_AXIS, FIXED, SETTING
from hilomoe.report.pareto import best, usable
from hilomoe.study.keys import config_key

Axis = Literal["experts", "levels", "rank", "mlp_width", "train_size"]
MIN_VALUES = 6  # distinct values per axis: a law and its held-out check (scaling.py)
DEFAULTS: dict[str, list[float]] = {
    "experts": [2, 4, 8, 16, 32, 64],
    "levels": [1, 2, 3, 4, 5, 6],
    "rank": [1, 2, 4, 8, 16, 32],
    "mlp_width": [0.25, 0.5, 1, 2, 4, 8],  # factors on the best configuration's widths
    "train_size": [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1],  # fractions of the train split
}


class LawDesign(Strict):
    """`laws:` in a study file: the axes that must end with a fitted law."""

    axes: list[Axis] = Field(default_factory=list)
    values: dict[Axis, list[float]] = Field(
        default_factory=dict, description="per axis, the grid (default: DEFAULTS); at least "
        f"{MIN_VALUES} distinct values")

    @model_validator(mode="after")
    def _check(self) -> LawDesign:
        for axis, values in self.values.items():
            if axis not in self.axes:
                raise ValueError(f"values.{axis}: {axis} is not one of the declared axes "
                                 f"{self.axes}")
            if len(set(values)) < MIN_VALUES:
                raise ValueError(f"values.{axis}: a law needs at least {MIN_VALUES} distinct "
                                 f"values, got {len(set(values))}")
            if any(v <= 0 for v in values) or (axis == "train_size" and max(values) > 1):
                raise ValueError(f"values.{axis}: values must be positive"
                                 + (" fractions at most 1" if axis == "train_size" else ""))
        return self

    def grid(self, axis: str) -> list[float]:
        return sorted(set(self.values.get(axis) or DEFAULTS[axis]))


def settings_at(base: dict, axis: str, value: float, fixed: TrainConfig) -> dict:
    """The settings of the design point `value` along `axis`, around `base` (a record's
    params over the study's fixed training configuration `fixed`)."""
    key = SETTING[axis]
    if axis == "mlp_width":
        widths = base.get(key, list(fixed.model.backbone.mlp))
        return {**base, key: [max(1, round(w * value)) for w in widths]}
    if axis in ("experts", "levels", "rank"):
        value = int(value)
    return {**base, key: value}


def check_design(design: LawDesign, fixed: TrainConfig, source: str) -> None:
    """Every grid point is a valid training configuration on the study's fixed settings."""
    for axis in design.axes:
        for value in design.grid(axis):
            try:
                fixed.with_overrides(**settings_at({}, axis, value, fixed))
            except ConfigError as err:
                reason = str(err).splitlines()[0].removeprefix("command line: ")
                raise ConfigError(f"{source}: laws: {axis} = {value:g} is not a valid training "
                                  f"configuration ({reason.rstrip('.')}).") from None


def design_center(records: list[dict]) -> dict | None:
    """The best completed HiLoMoE search trial (every other variant if there is none)."""
    points = [r for r in usable(records) if not r.get("repeat_of") and not r.get(DESIGN_AXIS)]
    return best(r for r in points if r.get("variant") == "hilomoe") or best(points)


def design_points(design: LawDesign, fixed: TrainConfig, records: list[dict]) -> list[dict]:
    """Tune points for every grid point not trained yet, axis by axis."""
    center = design_center(records)
    if center is None or not design.axes:
        return []
    done = {(r[DESIGN_AXIS], config_key(fixed.with_overrides(**r["params"])))
            for r in records if r.get(DESIGN_AXIS)}
    own = config_key(fixed.with_overrides(**center["params"]))  # the center is a grid point
    out = []
    for axis in design.axes:
        for value in design.grid(axis):
            settings = settings_at(dict(center["params"]), axis, value, fixed)
            key = config_key(fixed.with_overrides(**settings))
            if key != own and (axis, key) not in done:
                out.append({FIXED: settings, DESIGN_AXIS: axis})
    return out

