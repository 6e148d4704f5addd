"""The study's search space as Ray Tune domains, and a sampled point back as training settings.

    space = SearchSpace(spec)
    tuner = Tuner(..., param_space=space.tune_domains())      # Optuna samples through Tune
    overrides = space.overrides(trial_params)                   # dotted key -> value

Tune keys are the study's dotted key paths (`model.moe.experts`), kept flat. Choices of scalars
are sampled as themselves; a choice of mappings (e.g. whole stage recipes) is sampled by its
index, because Optuna's categorical distribution takes only scalars, and `config` maps the index
back and merges the mapping into the setting it names.
"""

from __future__ import annotations

from typing import Any

from hilomoe.study.spec import Domain, StudySpec

SCALARS = (bool, int, float, str, type(None))


def _indexed(domain: Domain) -> bool:
    return domain.choice is not None and not all(isinstance(v, SCALARS) for v in domain.choice)


def tune_domain(domain: Domain):
    """One `Domain` as a Ray Tune sampler (upper bounds of ranges are inclusive)."""
    from ray import tune

    if domain.choice is not None:
        return tune.choice(list(range(len(domain.choice))) if _indexed(domain) else domain.choice)
    if domain.ints is not None:
        lo, hi = domain.ints
        if domain.step:
            return (tune.qlograndint if domain.log else tune.qrandint)(lo, hi, domain.step)
        return (tune.lograndint if domain.log else tune.randint)(lo, hi + 1)
    lo, hi = domain.floats
    if domain.step:
        return (tune.qloguniform if domain.log else tune.quniform)(lo, hi, domain.step)
    return (tune.loguniform if domain.log else tune.uniform)(lo, hi)


class SearchSpace:
    def __init__(self, spec: StudySpec):
        self.spec = spec

    def tune_domains(self) -> dict[str, Any]:
        return {key: tune_domain(d) for key, d in self.spec.space.items()}

    def grid(self) -> dict[str, list[Any]]:
        """Every choice of every key, as Tune samples them: Optuna's GridSampler space."""
        return {key: list(range(len(d.choice))) if _indexed(d) else list(d.choice)
                for key, d in self.spec.space.items()}

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """A sampled point as dotted-path overrides of the study's training settings."""
        out = {}
        for key, domain in self.spec.space.items():
            value = params[key]
            out[key] = domain.choice[int(value)] if _indexed(domain) else value
        return out

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
