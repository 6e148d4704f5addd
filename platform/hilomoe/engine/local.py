"""In-process training (no Ray): configuration -> data -> model -> the three stages -> test."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from hilomoe.config import ModelConfig, TrainConfig, Variant
from hilomoe.data.batches import TensorBatches
from hilomoe.data.dataset import SPLITS, Dataset, open_dataset
from hilomoe.data.planted import PlantedProblem, generate_planted
from hilomoe.data.readers import ParquetBatches
from hilomoe.engine.loop import BatchSource, Engine, EpochRecord, run_stages
from hilomoe.model.ctr import CTRModel, FeatureSchema
from hilomoe.model.flops import model_cost


def memory_sources(problem: PlantedProblem, cfg: TrainConfig) -> dict[str, TensorBatches]:
    """Batch sources per split of an in-memory problem: train shuffled per epoch."""
    out = {}
    for name, split in problem.splits.items():
        train = name == "train"
        out[name] = TensorBatches(
            split.cat, split.num, split.label,
            batch_size=cfg.stages.base.batch_size if train else cfg.eval_batch_size,
            shuffle=train, seed=cfg.seed,
        )
    return out


def parquet_sources(dataset: Dataset, cfg: TrainConfig) -> dict[str, ParquetBatches]:
    """Batch sources per split of a canonical dataset on disk, streamed with pyarrow."""
    return {split: ParquetBatches(dataset, split,
                                  cfg.stages.base.batch_size if split == "train" else cfg.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed)
            for split in SPLITS}


@dataclass
class Data:
    """The three splits' batch sources, the feature schema, and the known ceiling if any."""

    schema: FeatureSchema
    sources: dict[str, BatchSource]
    bayes: dict[str, dict[str, float]] | None = None


def load_data(cfg: TrainConfig) -> Data:
    if cfg.data.path:
        ds = open_dataset(cfg.data.path)
        return Data(ds.schema, parquet_sources(ds, cfg), ds.meta.extra.get("bayes"))
    problem = generate_planted(cfg.data.synth)
    return Data(problem.schema, memory_sources(problem, cfg),
                {s: problem.bayes(s) for s in ("valid", "test")})


def base_model_config(model: ModelConfig) -> ModelConfig:
    """The non-MoE model under `model`: same embeddings and backbone, no experts."""
    return model.model_copy(update={"moe": model.moe.model_copy(update={"variant": Variant.DENSE})})


def build_model(cfg: TrainConfig, schema: FeatureSchema) -> CTRModel:
    """A seeded model whose base parameters (embeddings, W0 of every projection, head) depend
    only on the seed and the base settings, not on the experts: every variant of a study then
    starts from the same base, so one trained stage 1 serves them all (study/cache.py)."""
    torch.manual_seed(cfg.seed)
    model = CTRModel(schema, cfg.model)
    if model.has_experts:
        torch.manual_seed(cfg.seed)
        base = CTRModel(schema, base_model_config(cfg.model))
        unexpected = model.load_state_dict(base.state_dict(), strict=False).unexpected_keys
        assert not unexpected, unexpected  # the base model's names are a subset of the MoE's
    return model


def summarize(result: dict, cfg: TrainConfig, data: Data, seconds: float) -> dict:
    """The JSON-ready summary of `run_stages`' result: per-stage bests, test, cost, history."""
    cost = model_cost(data.schema, cfg.model, batch=cfg.eval_batch_size)
    test = result["test"]
    return {
        "stages": {k: v.summary() for k, v in result["stages"].items()},
        "test": {"auc": test["auc"], "logloss": test["logloss"],
                 "routing": {k: v for k, v in test.items() if k not in ("auc", "logloss")}},
        "bayes": data.bayes,
        "cost": cost.as_dict(),
        "history": [r.as_dict() for s in result["stages"].values() for r in s.history],
        "seconds": seconds,
    }


def train_local(cfg: TrainConfig, on_epoch: Callable[[EpochRecord], None] | None = None,
                data: Data | None = None, device: str = "cpu",
                autocast: torch.dtype | None = None) -> dict:
    """Train through every enabled stage in this process; return a JSON-ready summary."""
    t0 = time.perf_counter()
    data = data or load_data(cfg)
    engine = Engine(build_model(cfg, data.schema), cfg.stages, device, autocast=autocast)
    src = data.sources
    result = run_stages(engine, src["train"], src["valid"], src["test"], on_epoch)
    return summarize(result, cfg, data, time.perf_counter() - t0)
