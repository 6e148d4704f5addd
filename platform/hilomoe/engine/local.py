"""What a training session is built from (no Ray): the data's batch sources and the seeded model.

    data = load_data(cfg)                       # the planted problem in memory, or a dataset
    model = build_model(cfg, data.schema)       # seeded; the same base for every variant

`hilomoe.session` runs the stages over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hilomoe.config import ModelConfig, TrainConfig, Variant
from hilomoe.data.batches import TensorBatches
from hilomoe.data.dataset import SPLITS, Dataset, open_dataset
from hilomoe.data.planted import PlantedProblem, generate_planted, planted_schema
from hilomoe.data.readers import ParquetBatches
from hilomoe.data.subset import train_subset
from hilomoe.engine.loop import BatchSource
from hilomoe.model.ctr import CTRModel
from hilomoe.model.embedding import make_embedding
from hilomoe.schema import FeatureSchema


def memory_sources(problem: PlantedProblem, cfg: TrainConfig) -> dict[str, TensorBatches]:
    """Batch sources per split of an in-memory problem: train shuffled per epoch."""
    out = {}
    subset = train_subset(cfg.data)
    for name, split in problem.splits.items():
        train = name == "train"
        cat, num, label = split.cat, split.num, split.label
        if train and subset is not None:
            cat, num, label = subset.apply((np.asarray(cat), np.asarray(num), np.asarray(label)))
        out[name] = TensorBatches(
            cat, num, label,
            batch_size=cfg.stages.base.batch_size if train else cfg.eval_batch_size,
            shuffle=train, seed=cfg.seed,
        )
    return out


def parquet_sources(dataset: Dataset, cfg: TrainConfig) -> dict[str, ParquetBatches]:
    """Batch sources per split of a canonical dataset on disk, streamed with pyarrow."""
    return {split: ParquetBatches(dataset, split,
                                  cfg.stages.base.batch_size if split == "train" else cfg.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed,
                                  subset=train_subset(cfg.data) if split == "train" else None)
            for split in SPLITS}


@dataclass
class Data:
    """The three splits' batch sources, the feature schema, and the known ceiling if any."""

    schema: FeatureSchema
    sources: dict[str, BatchSource]
    bayes: dict[str, dict[str, float]] | None = None


def schema_for(cfg: TrainConfig) -> FeatureSchema:
    """The fields a configuration trains on: its dataset's (real vocabularies), else its
    planted problem's; reads metadata only."""
    if cfg.data.path:
        return open_dataset(cfg.data.path, check_shards=False).schema
    return planted_schema(cfg.data.synth)


def load_data(cfg: TrainConfig) -> Data:
    if cfg.data.path:
        ds = open_dataset(cfg.data.path, training=True)
        return Data(ds.schema, parquet_sources(ds, cfg), ds.meta.extra.get("bayes"))
    problem = generate_planted(cfg.data.synth)
    return Data(problem.schema, memory_sources(problem, cfg),
                {s: problem.bayes(s) for s in ("valid", "test")})


def base_model_config(model: ModelConfig) -> ModelConfig:
    """The non-MoE model under `model`: same embeddings and backbone, no experts."""
    return model.model_copy(update={"moe": model.moe.model_copy(update={"variant": Variant.DENSE})})


def build_model(cfg: TrainConfig, schema: FeatureSchema, device: str | torch.device = "cpu",
                sharded: bool = False) -> CTRModel:
    """A seeded model whose base parameters (embeddings, W0 of every projection, head) depend
    only on the seed and the base settings, not on the experts: every variant of a study then
    starts from the same base, so one trained stage 1 serves them all (study/cache.py).

    The tables draw from generators of their own (`embedding.init_table`), so each rank of a
    sharded model draws only its own; `sharded` splits TorchRec tables across the process group.
    """
    m = cfg.model
    embedding = make_embedding(schema, m.embedding_dim, m.embedding.backend, cfg.seed, device,
                               sharded)
    torch.manual_seed(cfg.seed)
    model = CTRModel(schema, m, embedding)
    if model.has_experts:
        torch.manual_seed(cfg.seed)
        base = CTRModel(schema, base_model_config(m), embedding)  # shares the tables
        dense = {k: v for k, v in base.state_dict().items() if not k.startswith("embedding.")}
        unexpected = model.load_state_dict(dense, strict=False).unexpected_keys
        assert not unexpected, unexpected  # the base model's names are a subset of the MoE's
    return model.to(device)
