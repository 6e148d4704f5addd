"""The Ray Train shell around engine/: resources, workers, checkpoints, failures and resume.

    from hilomoe.train import train_ray
    summary = train_ray(cfg, out_dir="runs/example")      # joins RAY_ADDRESS or starts Ray

Nothing here is imported by the Ray-free core; `hilomoe train --local` never touches it.
"""

from hilomoe.train.driver import TrainRun, train_ray
from hilomoe.train.resources import ResourceError, WorkerPlan, plan_workers

__all__ = ["ResourceError", "TrainRun", "WorkerPlan", "plan_workers", "train_ray"]
