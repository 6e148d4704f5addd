"""`hilomoe model summary`: a configured model's parameters, FLOPs and embedding bytes.

One plain dict, the `--json` output: the analytic count (`model_cost`), the count torch's
FlopCounterMode measures on a real forward pass, and the bytes of embedding tables and their
optimiser state each Ray Train worker holds under TorchRec's sharding plan.
"""

from __future__ import annotations

import torch

from hilomoe.config import EmbeddingConfig, TrainConfig
from hilomoe.model.ctr import CTRModel
from hilomoe.model.embedding import embedding_bytes
from hilomoe.model.flops import measured_flops, model_cost
from hilomoe.model.routing import RoutingMode
from hilomoe.schema import FeatureSchema


def model_summary(cfg: TrainConfig, schema: FeatureSchema, mode: RoutingMode, batch: int,
                  workers: int) -> dict:
    """The summary of `cfg`'s model on `schema`'s fields (see `schema_for`), counted for
    `mode` routing at `batch` samples, with embedding bytes split over `workers` workers."""
    cost = model_cost(schema, cfg.model, mode, batch)
    torch.manual_seed(cfg.seed)
    # FLOPs are counted on the torch backend: the same function, one table, no FBGEMM padding
    model = CTRModel(schema, cfg.model.model_copy(
        update={"embedding": EmbeddingConfig(backend="torch")}))
    model.set_routing(mode)
    cat = torch.stack([torch.randint(0, v, (batch,)) for v in schema.vocab_sizes], dim=1)  # (B, F)
    num = torch.randn(batch, schema.numeric)  # (B, numeric)
    backend = cfg.model.embedding.backend
    optimizer = cfg.stages.base.embedding_optimizer
    return {
        **cost.as_dict(),
        "flops_measured": measured_flops(model, cat, num),
        "variant": cfg.model.moe.variant.value if cfg.model.moe.has_experts else "dense",
        "routing": mode.value,
        "batch": batch,
        "fields": {"categorical": len(schema.vocab_sizes), "numeric": schema.numeric,
                   "embedding_rows": schema.embedding_rows},
        "embedding": {"backend": backend, "workers": workers, "optimizer": optimizer,
                      "bytes_per_worker": embedding_bytes(schema, cfg.model.embedding_dim,
                                                          backend, workers, optimizer)},
        "parts": {k: {"params_total": v.params_total, "params_active": int(v.params_active),
                      "flops": v.flops} for k, v in cost.parts.items()},
    }
