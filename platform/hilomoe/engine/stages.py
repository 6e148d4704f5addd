"""The three-stage recipe: what each stage routes, trains and freezes.

Our reading of the paper's "principled three-stage training framework" (arXiv 2510.10432):

  1. base     experts off (the L = 0 path): train embeddings, W0 and the head. This IS the
              non-MoE baseline, and its best checkpoint is kept.  The embedding tables train
              with the stage's sparse `embedding_optimizer` (optimizers.py), the rest with its
              dense optimiser.
  2. experts  start from stage 1's best weights, freeze the base, train experts and routers with
              dense (soft) routing and the diversity and balance losses. U starts at zero, so
              the stage starts exactly at stage 1's function (and validation loss).
  3. joint    unfreeze everything, switch to sparse top-k routing, train jointly with the base
              at a lower learning rate (base_lr_mult) and the balance and z losses.

Any stage can be disabled. With stages 1 and 2 off, stage 3 is single-stage joint training from
scratch, and then the base trains at the stage's full learning rate (there is no trained base
to protect, so base_lr_mult does not apply). A model without experts trains in stage 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass

from hilomoe.config import StageConfig, StageName, StagesConfig
from hilomoe.engine.optimizers import table_spec
from hilomoe.model.ctr import CTRModel
from hilomoe.model.embedding import TableOptimizer
from hilomoe.model.routing import RoutingMode

ROUTING = {
    StageName.BASE: RoutingMode.OFF,
    StageName.EXPERTS: RoutingMode.DENSE,
    StageName.JOINT: RoutingMode.SPARSE,
}


def stage_plan(stages: StagesConfig, has_experts: bool) -> list[StageName]:
    """The stages that will run, in order."""
    if not has_experts:
        return [StageName.BASE]
    return [name for name in StageName if stages.get(name).enabled]


@dataclass
class StageSetup:
    name: StageName
    config: StageConfig
    routing: RoutingMode
    param_groups: list[dict]  # for the dense optimizer: params and their learning rates
    tables: TableOptimizer | None  # the embedding tables' optimiser; None: frozen


def prepare_stage(model: CTRModel, name: StageName, cfg: StageConfig,
                  base_pretrained: bool) -> StageSetup:
    """Set routing and requires_grad on `model` for stage `name`; return its optimizer groups
    and the tables' optimiser (the tables are base parameters: frozen in stage 2, at
    base_lr_mult in stage 3)."""
    base, experts = model.base_parameters(), model.expert_parameters()
    tables = model.embedding.table_parameters()
    model.set_routing(ROUTING[name])
    if name is StageName.BASE:
        trainable, groups = base + tables, [{"params": base, "lr": cfg.lr}]
        spec = table_spec(cfg)
    elif name is StageName.EXPERTS:
        trainable, groups = experts, [{"params": experts, "lr": cfg.lr}]
        spec = None
    else:
        mult = cfg.base_lr_mult if base_pretrained else 1.0
        trainable = base + tables + experts
        groups = [{"params": base, "lr": cfg.lr * mult}, {"params": experts, "lr": cfg.lr}]
        spec = table_spec(cfg, mult)
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return StageSetup(name, cfg, ROUTING[name], [g for g in groups if g["params"]], spec)
