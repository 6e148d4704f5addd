"""Field embeddings: one table per categorical field and one vector per numeric field.

    cat: (B, F_c) int64 ids, id_f in [0, V_f);  num: (B, F_n) float
      -> x0 = [T_1[id_1], ..., T_Fc[id_Fc], num_1 w_1, ..., num_Fn w_Fn]:  (B, (F_c + F_n) e)

(the numeric embedding v * w_j is FuxiCTR's). Two backends, `model.embedding.backend`:

    TorchRecEmbedding  TorchRec tables on FBGEMM's table-batched kernels, one table per field.
                       In one process a FusedEmbeddingBagCollection; across workers a
                       DistributedModelParallel whose planner places each table on one rank
                       (table-wise sharding, byte-balanced). The optimiser is fused into the
                       backward pass and touches only the rows a batch used.
    TorchEmbedding     every field in one nn.Embedding with per-field id offsets, sparse gradients
                       and a sparse torch optimiser (engine/optimizers.py), replicated on every
                       worker. `sparse=False` is the dense reference (a gradient for every row,
                       every step) that the equivalence tests compare against; no config picks it.

Both save the same state: `tables.{i}` (V_i, e) for categorical field i and `numeric` (F_n, e).
A sharded backend saves and loads only the tables its rank holds (table-wise shards, so a table
is always whole). Weights therefore move between backends, and a checkpoint written by W workers
loads on any other number of them.

Training: with `trainable` off the lookups run without autograd, so no gradient (and no fused
update) reaches the tables: stage 2 freezes the base. `configure(spec)` sets the tables'
optimiser for the next stage.
"""


from __future__ import annotations

from hilomoe.model.embedding.base import (INIT_STD, FeatureEmbedding, OptimizerKind,
                                          TableOptimizer, init_table)
from hilomoe.model.embedding.replicated import TorchEmbedding
from hilomoe.model.embedding.sharded import TorchRecEmbedding, table_placement
from hilomoe.schema import FeatureSchema

__all__ = ["INIT_STD", "FeatureEmbedding", "OptimizerKind", "TableOptimizer", "TorchEmbedding",
           "TorchRecEmbedding", "embedding_bytes", "init_table", "make_embedding",
           "table_placement"]


def make_embedding(schema: FeatureSchema, dim: int, backend: str = "torchrec", seed: int = 0,
                   device=None, sharded: bool = False) -> FeatureEmbedding:
    """The configured backend; `sharded`: split TorchRec tables across the process group."""
    if backend == "torchrec":
        return TorchRecEmbedding(schema, dim, seed, device, sharded)
    return TorchEmbedding(schema, dim, seed, device)


STATE_FLOATS_PER_ROW = {"sgd": lambda e: 0, "rowwise_adagrad": lambda e: 1,
                        "adagrad": lambda e: e, "adam": lambda e: 2 * e}


def embedding_bytes(schema: FeatureSchema, dim: int, backend: str, workers: int,
                    optimizer: OptimizerKind = "rowwise_adagrad") -> list[int]:
    """Bytes each of `workers` ranks holds for the categorical tables and their optimiser
    state (fp32): TorchRec's planner gives each table to one rank (FBGEMM rounds a row up to a
    multiple of 4 floats); the torch backend keeps every table on every rank."""
    width = -(-dim // 4) * 4 if backend == "torchrec" else dim
    per_row = width + STATE_FLOATS_PER_ROW[optimizer](width)
    sizes = [4 * v * per_row for v in schema.vocab_sizes]
    if backend != "torchrec" or workers == 1:
        return [sum(sizes)] * workers
    out = [0] * workers
    for size, rank in zip(sizes, table_placement(schema, dim, workers)):
        out[rank] += size
    return out
