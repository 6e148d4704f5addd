"""Statistical check of the recipe on the planted hierarchical problem, over several seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hilomoe.config import load_config
from hilomoe.engine.local import load_data
from hilomoe.session import train_local

SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_stage_three_beats_stage_one_by_more_than_the_seed_spread():
    """On the example configuration, the joint stage's validation AUC exceeds the base stage's
    (the non-MoE baseline) for every training seed, and the mean gain exceeds the seed-to-seed
    spread (max - min) of the baseline's AUC. The data is fixed; seeds change the model's
    initialisation and the batch order."""
    torch.set_num_threads(1)  # bit-reproducible runs
    base_cfg = load_config("studies/train_example.yaml")
    data = load_data(base_cfg)  # the same rows for every seed
    base, joint = [], []
    for seed in SEEDS:
        cfg = base_cfg.model_copy(update={"seed": seed})
        stages = train_local(cfg, data=data)["stages"]
        base.append(stages["base"]["auc"])
        joint.append(stages["joint"]["auc"])
    base, joint = np.array(base), np.array(joint)
    gains = joint - base
    spread = base.max() - base.min()
    report = f"stage-1 AUC {base.round(4)}, stage-3 AUC {joint.round(4)}, spread {spread:.4f}"
    assert gains.min() > 0, report
    assert gains.mean() > spread, report
    assert gains.mean() > 2 * joint.std(ddof=1), report  # the gain also clears stage 3's own noise
