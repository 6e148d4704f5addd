"""The key of what a configuration trains: equal for two points of a study that train the same
model. No study types here: the study file's types (spec.py, design.py), the search space
(space.py) and the caches (cache.py) all import it.
"""

from __future__ import annotations

import hashlib
import json

from hilomoe.config import TrainConfig

def config_key(cfg: TrainConfig) -> str:
    """Equal for configurations that train the same model: the effective configuration, less
    where the data lives and how it runs (the shuffle buffer aside, which orders samples; the
    trial and stage-1 caches add the precision a result was trained in)."""
    raw = cfg.effective().model_dump(mode="json")
    raw.pop("runtime")
    shuffle = raw.pop("ray")["shuffle_buffer"]
    raw["data"].pop("path")
    return hashlib.sha256(json.dumps({"config": raw, "shuffle_buffer": shuffle},
                                     sort_keys=True).encode()).hexdigest()[:24]
