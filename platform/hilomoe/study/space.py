"""The study's search space: conditional, so that a setting is only drawn where it applies, and
keyed by what a point trains, so that two points that train the same model are one.

    space = SearchSpace(spec)
    OptunaSearch(space=space.sample, ...)        # Optuna's define-by-run space through Tune
    overrides = space.overrides(trial_params)    # dotted key -> value (drawn keys only)
    space.key(trial_params)                      # equal for points that train the same model
    space.points()                               # every distinct point, when there are few

A key applies to a point when its values would train different models there: its corners give
different effective configurations (`TrainConfig.effective`) given what was drawn so far. So a
`dense` trial never draws `model.moe.experts`, and `levels: 0` turns every other MoE setting
off. Keys that switch others on or off (`GATES`) are drawn first.

Tune keys are the study's dotted key paths (`model.moe.experts`), kept flat. Choices of scalars
are drawn as themselves; a choice of mappings (e.g. whole stage recipes) is drawn by its index,
because Optuna's categorical distribution takes only scalars, and `overrides` maps the index back.
"""

from __future__ import annotations

from typing import Any, Iterator

from hilomoe.config import ConfigError, TrainConfig
from hilomoe.report.fields import FIXED
from hilomoe.study.keys import config_key
from hilomoe.study.spec import Domain, StudySpec

__all__ = ["FIXED", "SearchSpace", "config_key"]  # FIXED: report/fields.py; config_key: keys.py

SCALARS = (bool, int, float, str, type(None))
# settings that decide whether others apply, drawn before the rest (in this order)
GATES = ("model.moe.variant", "model.moe.levels", "stages.base.enabled",
         "stages.experts.enabled", "stages.joint.enabled")
# `points()` lists a discrete space up to this many points (and an int range up to this many
# values); a larger or continuous space is drawn without a count
MAX_POINTS = 100_000


def _indexed(domain: Domain) -> bool:
    return domain.choice is not None and not all(isinstance(v, SCALARS) for v in domain.choice)


def _values(domain: Domain) -> list[Any] | None:
    """Every value a domain can take, as Tune draws it; None for a continuous range."""
    if domain.choice is not None:
        return list(range(len(domain.choice))) if _indexed(domain) else list(domain.choice)
    if domain.ints is not None:
        lo, hi = domain.ints
        step = int(domain.step or 1)
        if domain.log or (hi - lo) // step >= MAX_POINTS:
            return None
        return list(range(lo, hi + 1, step))
    return None


def _gate(key: str) -> int | None:
    """The position in GATES of the first gate `key` sets (itself, or inside its mapping)."""
    return next((i for i, g in enumerate(GATES) if g == key or g.startswith(key + ".")), None)


class SearchSpace:
    def __init__(self, spec: StudySpec):
        self.spec = spec
        # the order keys are drawn: keys that set a gate (or a mapping holding one) first
        gates = sorted((k for k in spec.space if _gate(k) is not None), key=_gate)
        self.keys = gates + [k for k in spec.space if k not in gates]

    # -- a point: Tune's flat dict of the drawn keys ------------------------------------------

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """A point as dotted-path overrides of the study's training settings: a drawn point's
        keys (a space key it did not draw keeps the study's fixed setting), or a fixed point's
        resolved settings."""
        if FIXED in params:
            return dict(params[FIXED])
        out = {}
        for key in self.keys:
            if key in params:
                domain, value = self.spec.space[key], params[key]
                out[key] = domain.choice[int(value)] if _indexed(domain) else value
        return out

    def config(self, params: dict[str, Any]) -> TrainConfig:
        return self.spec.train.with_overrides(**self.overrides(params))

    def key(self, params: dict[str, Any]) -> str:
        """Equal for two points that train the same model."""
        return config_key(self.config(params))

    def applies(self, key: str, drawn: dict[str, Any]) -> bool:
        """Whether `key` can change what is trained, given the keys `drawn` so far: its corners
        give different effective configurations. A combination that does not validate (a
        corner with the rest still at their fixed settings) counts as applying."""
        domain = self.spec.space[key]
        seen = set()
        for value in _values(domain) if domain.choice is not None else domain.corners():
            try:
                seen.add(self.key({**drawn, key: value}))
            except ConfigError:
                return True
            if len(seen) > 1:
                return True
        return False

    # -- drawing ------------------------------------------------------------------------------

    def sample(self, trial) -> dict[str, Any]:
        """Optuna's define-by-run space: draw each key that applies, gates first. Returns the
        point (a stepped log range rounded to its step)."""
        drawn: dict[str, Any] = {}
        for key in self.keys:
            if self.applies(key, drawn):
                drawn[key] = _suggest(trial, key, self.spec.space[key])
        return drawn

    def grid(self) -> dict[str, list[Any]]:
        """Every choice of every key, as Tune draws them: Optuna's GridSampler space."""
        return {key: _values(d) for key, d in self.spec.space.items()}

    def points(self) -> list[dict[str, Any]] | None:
        """Every distinct point of a discrete space (a dense point once, whatever the MoE
        choices), in drawing order; None for a continuous or very large space."""
        if any(_values(self.spec.space[k]) is None for k in self.keys):
            return None
        size = 1
        for k in self.keys:
            size *= len(_values(self.spec.space[k]))
        if size > MAX_POINTS:
            return None
        out, seen = [], set()
        for point in self._walk(0, {}):
            key = self.key(point)
            if key not in seen:
                seen.add(key)
                out.append(point)
        return out

    def _walk(self, i: int, drawn: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if i == len(self.keys):
            yield drawn
            return
        key = self.keys[i]
        if not self.applies(key, drawn):
            yield from self._walk(i + 1, drawn)
            return
        for value in _values(self.spec.space[key]):
            yield from self._walk(i + 1, {**drawn, key: value})

    def labels(self) -> dict[str, str]:
        """Short column names for tables: the last part of each key path, made unique."""
        out: dict[str, str] = {}
        for key in self.spec.space:
            parts = key.split(".")
            n = 1
            while ".".join(parts[-n:]) in out.values() and n < len(parts):
                n += 1
            out[key] = ".".join(parts[-n:])
        return out


def _suggest(trial, key: str, domain: Domain) -> Any:
    """One key from an Optuna trial (range upper bounds are inclusive, as in the study file)."""
    if domain.choice is not None:
        return trial.suggest_categorical(key, _values(domain))
    lo, hi = domain.ints or domain.floats
    is_int = domain.ints is not None
    draw = trial.suggest_int if is_int else trial.suggest_float
    if domain.step and domain.log:  # Optuna takes one of the two: draw on the log scale, round
        steps = round((draw(key, lo, hi, log=True) - lo) / domain.step)
        value = min(hi, lo + steps * domain.step)
        return int(value) if is_int else value
    if is_int:
        return draw(key, lo, hi, step=int(domain.step or 1), log=domain.log)
    return draw(key, lo, hi, step=domain.step, log=domain.log)
