"""The study's searcher: Optuna through Ray Tune, over the conditional space, never handing
Tune a point it has handed out before.

    searcher = make_searcher(spec, space)             # a Tune Searcher
    tune.TuneConfig(search_alg=searcher, num_samples=trials_to_run(spec, space))
    tune.TuneConfig(search_alg=FixedPoints(points), num_samples=len(points))   # repeats

Samplers (TPE above all, in a small discrete space) propose points again. A point that trains
the same model as an earlier trial (`SearchSpace.key`) is not a new trial: Optuna is told the
earlier trial's outcome for it (now, or when that trial ends) and draws again. When every
distinct point of a discrete space has been handed out, or `MAX_DRAWS` draws in a row repeat,
the search is finished: the study ends with fewer trials than its budget rather than train a
point twice.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from hilomoe import jsonio
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import StudySpec

MAX_DRAWS = 200  # draws in a row that all repeat earlier points: the space is spent


def make_sampler(spec: StudySpec, space: SearchSpace):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    # TPE for one objective; with two, Optuna's TPE is its multi-objective sampler (MOTPE)
    return optuna.samplers.TPESampler(seed=spec.seed,
                                      n_startup_trials=min(10, max(2, spec.budget.trials // 3)))


def trials_to_run(spec: StudySpec, space: SearchSpace) -> int:
    """The budget, or fewer when the space holds fewer distinct points."""
    points = space.points()
    return spec.budget.trials if points is None else min(spec.budget.trials, len(points))


def make_searcher(spec: StudySpec, space: SearchSpace) -> DistinctSearch:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    points = space.points()
    return DistinctSearch(space, None if points is None else len(points),
                          metric=metrics if spec.multi_objective else metrics[0],
                          mode=modes if spec.multi_objective else modes[0],
                          sampler=make_sampler(spec, space))


class DistinctSearch(OptunaSearch):
    """`OptunaSearch` on `space.sample` (define-by-run) that hands out each distinct point once.

    `distinct`: how many distinct points the space holds (None: unknown, e.g. continuous)."""

    def __init__(self, space: SearchSpace, distinct: int | None, **kwargs: Any):
        super().__init__(space=space.sample, **kwargs)
        self.points, self.distinct = space, distinct
        self._first: dict[str, str] = {}  # point key -> the trial that trains it
        self._twins: dict[str, list] = {}  # trial id -> Optuna trials waiting for its outcome
        self._ended: set[str] = set()

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.distinct is not None and len(self._first) >= self.distinct:
            return Searcher.FINISHED
        for _ in range(MAX_DRAWS):
            params = super().suggest(trial_id)
            first = self._first.setdefault(self.points.key(params), trial_id)
            if first == trial_id:
                return params
            twin = self._ot_trials.pop(trial_id)  # a repeat: it gets `first`'s outcome
            if first in self._ended:
                self._tell_like(first, twin)
            else:
                self._twins.setdefault(first, []).append(twin)
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error)
        self._ended.add(trial_id)
        for twin in self._twins.pop(trial_id, []):
            self._tell_like(trial_id, twin)

    def _tell_like(self, trial_id: str, twin) -> None:
        """Tell Optuna that `twin` ended as trial `trial_id` did."""
        from optuna.trial import TrialState

        number = self._ot_trials[trial_id].number
        done = self._ot_study.get_trials(deepcopy=False)[number]
        if done.state == TrialState.COMPLETE:
            self._ot_study.tell(twin, done.values)
        else:  # pruned, failed, or a value Optuna refused (NaN): never drawn again either way
            self._ot_study.tell(twin, state=(TrialState.PRUNED if done.state == TrialState.PRUNED
                                             else TrialState.FAIL))


class FixedPoints(Searcher):
    """Hands Tune a fixed list of points, in order (a study's repeats). Its state is JSON."""

    def __init__(self, points: list[dict]):
        super().__init__()
        self.todo = list(points)

    def suggest(self, trial_id: str) -> dict | str:
        return self.todo.pop(0) if self.todo else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write(jsonio.dumps(self.todo))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.todo = json.load(f)
