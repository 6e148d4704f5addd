"""The three-stage recipe: what each stage routes, trains and freezes.

Our reading of the paper's "principled three-stage training framework" (arXiv 2510.10432):

  1. base     experts off (the L = 0 path): train embeddings, W0 and the head. This IS the
              non-MoE baseline, and its best checkpoint is kept.
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

import torch

from hilomoe.config import StageConfig, StageName, StagesConfig
from hilomoe.model.ctr import CTRModel
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
    param_groups: list[dict]  # for the optimizer: params and their learning rates


def prepare_stage(model: CTRModel, name: StageName, cfg: StageConfig,
                  base_pretrained: bool) -> StageSetup:
    """Set routing and requires_grad on `model` for stage `name`; return its optimizer groups."""
    base, experts = model.base_parameters(), model.expert_parameters()
    model.set_routing(ROUTING[name])
    if name is StageName.BASE:
        trainable, groups = base, [{"params": base, "lr": cfg.lr}]
    elif name is StageName.EXPERTS:
        trainable, groups = experts, [{"params": experts, "lr": cfg.lr}]
    else:
        base_lr = cfg.lr * (cfg.base_lr_mult if base_pretrained else 1.0)
        trainable = base + experts
        groups = [{"params": base, "lr": base_lr}, {"params": experts, "lr": cfg.lr}]
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return StageSetup(name, cfg, ROUTING[name], [g for g in groups if g["params"]])


def make_optimizer(setup: StageSetup) -> torch.optim.Optimizer:
    cfg = setup.config
    if cfg.optimizer == "adam":
        return torch.optim.Adam(setup.param_groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(setup.param_groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(setup.param_groups, momentum=0.9, weight_decay=cfg.weight_decay)
