"""Everything that runs on Ray: the Ray Data source and batches, the runtime helpers and the Ray
connection, worker resources, the one TorchTrainer, its workers and `hilomoe train`'s driver.

    from hilomoe.distributed.driver import TrainRun, train_ray
    summary = train_ray(TrainRun.create(cfg, out_dir="runs/example"))   # joins RAY_ADDRESS or starts Ray

The Ray-free core (data readers, model, engine, session) imports nothing from here;
`hilomoe train --local` never touches it. This package's `__init__` imports nothing, so that
`ray_source` stays importable without torch (Ray unpickles it in its read tasks).
"""
