"""What names a study's points: the key of what a configuration trains, and the names a fixed
point's Tune config and its record use. No study types here: the study file's types (spec.py,
design.py) and the search space (space.py) all import these.
"""

from __future__ import annotations

import hashlib
import json

from hilomoe.config import TrainConfig

# A fixed point (a repeat, a law design's grid point) holds its settings already resolved
# under FIXED, and says what it is for under REPEAT_OF (`study/verdict.py`) or DESIGN_AXIS
# (`study/design.py`); a record keeps the same names.
FIXED, REPEAT_OF, DESIGN_AXIS = "settings", "repeat_of", "design_axis"


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
