"""The CTR model: field embeddings -> backbone (DCNv2 cross network and MLP) -> logit.

    cat: (B, F_c) int64 ids,  num: (B, F_n) float32
      -> FeatureEmbedding          x0: (B, d0),  d0 = (F_c + F_n) * e   (embedding.py: torch or
                                                                        TorchRec tables)
      -> cross  x_{l+1} = x0 * proj(x_l) + x_l        (DCNv2, Wang et al. 2021, eq. 1)
      -> mlp    h_{l+1} = act(proj(h_l))
         (parallel: cross(x0) and mlp(x0) concatenated; stacked: mlp(cross(x0)))
      -> head   logit = w^T h + b                      (B,)

Every `proj` above is a `Projection` (layers.py): dense, or with experts where `moe.apply_to`
names its block. The non-MoE baseline is the identical model with no experts.
`projection_specs` lists every projection's shape; the model and the FLOP accounting (flops.py)
both build from it, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hilomoe.config import ModelConfig
from hilomoe.model.embedding import FeatureEmbedding, make_embedding
from hilomoe.model.layers import Projection, make_projection
from hilomoe.model.routing import Routing, RoutingMode
from hilomoe.schema import FeatureSchema

__all__ = ["CTRModel", "FeatureSchema", "ProjectionSpec", "projection_specs"]


@dataclass(frozen=True)
class ProjectionSpec:
    name: str  # "cross.0", "mlp.1", "head"
    d_in: int
    d_out: int
    experts: bool  # whether this projection carries experts (when the config has any)


def projection_specs(schema: FeatureSchema, cfg: ModelConfig) -> list[ProjectionSpec]:
    """Every dense projection of the model, in forward order (the head last)."""
    bb, moe = cfg.backbone, cfg.moe
    d0 = schema.num_fields * cfg.embedding_dim
    specs = [ProjectionSpec(f"cross.{i}", d0, d0, "cross" in moe.apply_to)
             for i in range(bb.cross_layers)]
    d = d0  # cross layers keep the width d0, so the MLP reads d0 in either structure
    for i, width in enumerate(bb.mlp):
        specs.append(ProjectionSpec(f"mlp.{i}", d, width, "mlp" in moe.apply_to))
        d = width
    mlp_out = bb.mlp[-1] if bb.mlp else 0
    if bb.structure == "parallel":
        head_in = (d0 if bb.cross_layers else 0) + mlp_out
    else:
        head_in = mlp_out or d0
    specs.append(ProjectionSpec("head", head_in, 1, False))
    return specs


class CTRModel(nn.Module):
    """forward(cat, num) -> (logit: (B,), routings: one Routing per MoE projection that routed).

    `embedding` is injected (TorchRec-style: the sparse arch apart from the dense one); without
    one, the configured backend is built unsharded with seed 0.
    """

    def __init__(self, schema: FeatureSchema, cfg: ModelConfig,
                 embedding: FeatureEmbedding | None = None):
        super().__init__()
        self.schema, self.cfg = schema, cfg
        specs = projection_specs(schema, cfg)
        moe = cfg.moe

        def proj(spec: ProjectionSpec) -> Projection:
            return make_projection(spec.d_in, spec.d_out, moe if spec.experts else None)

        self.embedding = embedding or make_embedding(schema, cfg.embedding_dim,
                                                     cfg.embedding.backend)
        self.cross = nn.ModuleList(proj(s) for s in specs if s.name.startswith("cross."))
        self.mlp = nn.ModuleList(proj(s) for s in specs if s.name.startswith("mlp."))
        self.head = nn.Linear(specs[-1].d_in, 1)
        self.dropout = nn.Dropout(cfg.backbone.dropout)
        self.parallel = cfg.backbone.structure == "parallel"

    def forward(self, cat: Tensor, num: Tensor) -> tuple[Tensor, list[Routing]]:
        routings: list[Routing] = []

        def apply(layer: Projection, x: Tensor) -> Tensor:
            y, routing = layer(x)
            if routing is not None:
                routings.append(routing)
            return y

        x0 = self.embedding(cat, num)
        xc = x0
        for layer in self.cross:
            xc = x0 * apply(layer, xc) + xc
        h = x0 if (self.parallel or not self.cross) else xc
        for layer in self.mlp:
            h = self.dropout(torch.relu(apply(layer, h)))
        if self.parallel:
            parts = ([xc] if self.cross else []) + ([h] if self.mlp else [])
            h = torch.cat(parts, dim=1)
        return self.head(h).squeeze(-1), routings

    # -- what the stage engine needs ---------------------------------------------------------

    def projections(self) -> list[Projection]:
        return [*self.cross, *self.mlp]

    def moe_layers(self) -> list[Projection]:
        return [p for p in self.projections() if p.has_experts]

    @property
    def has_experts(self) -> bool:
        return bool(self.moe_layers())

    def set_routing(self, mode: RoutingMode) -> None:
        for layer in self.moe_layers():
            layer.mode = mode

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.moe_layers() for p in layer.expert_parameters()]

    def expert_state_names(self) -> set[str]:
        """The state dict's names of the experts and routers (trained from stage 2 on)."""
        experts = {id(p) for p in self.expert_parameters()}
        return {n for n, p in self.named_parameters() if id(p) in experts}

    def base_state(self) -> dict[str, Tensor]:
        """The state dict without the experts: what the non-MoE model under this one holds."""
        names = self.expert_state_names()
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k not in names}

    def base_parameters(self) -> list[nn.Parameter]:
        """Dense base parameters: everything but the experts and the embedding tables (which
        their own sparse or fused optimiser trains)."""
        skip = {id(p) for p in self.expert_parameters() + self.embedding.table_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]
