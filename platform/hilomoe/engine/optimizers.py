"""Optimisers: the dense parameters' (Adam, AdamW, SGD) and the embedding tables' sparse ones.

The dense optimiser steps every trainable dense parameter. The tables take the stage's
`embedding_optimizer`, which updates only the rows a batch touched: fused into FBGEMM's backward
kernels for the TorchRec backend (nothing to step here), or the torch optimiser with the same
rule for the torch backend (`make_table_optimizer`): SGD, Adagrad, SparseAdam, and
`RowWiseAdagrad` below (torch has none; FBGEMM's EXACT_ROWWISE_ADAGRAD is the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hilomoe.config import StageConfig
from hilomoe.model.embedding import FeatureEmbedding, TableOptimizer

# The tables' learning rate when a stage sets none: Adagrad's steps shrink with the squared
# gradients it has summed, so it starts larger than Adam's; measured on the planted problems
# (see docs/training.md, "Embeddings at real vocabularies").
EMBEDDING_LR = {"rowwise_adagrad": 0.1, "adagrad": 0.05, "adam": None, "sgd": None}


def make_optimizer(param_groups: list[dict], cfg: StageConfig) -> torch.optim.Optimizer:
    """The dense optimiser of a stage (the tables are not in `param_groups`)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=cfg.weight_decay)


def table_spec(cfg: StageConfig, lr_mult: float = 1.0) -> TableOptimizer:
    """The tables' optimiser in a stage: its kind, and its learning rate (`embedding_lr`, else
    the kind's default, else the stage's lr) times the base parameters' multiplier."""
    lr = cfg.embedding_lr or EMBEDDING_LR[cfg.embedding_optimizer] or cfg.lr
    return TableOptimizer(cfg.embedding_optimizer, lr * lr_mult)


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad on sparse gradients, FBGEMM's EXACT_ROWWISE_ADAGRAD:

        g_i = the sum of row i's gradients in the batch (only rows the batch touched)
        s_i += mean_j g_ij^2                     one accumulator per row, not per element
        w_i -= lr g_i / (sqrt(s_i) + eps)
    """

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1)
                rows, values = grad.indices()[0], grad.values()  # (n,), (n, e)
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                total = state["sum"]
                total.index_add_(0, rows, values.pow(2).mean(1))
                scale = group["lr"] / (total[rows].sqrt() + group["eps"])
                p.index_add_(0, rows, values * -scale.unsqueeze(1))


def make_table_optimizer(embedding: FeatureEmbedding,
                         spec: TableOptimizer | None) -> torch.optim.Optimizer | None:
    """Set the tables up for a stage; returns the torch optimiser to step, or None when the
    tables are frozen (`spec` None) or their update is fused into the backward pass."""
    embedding.configure(spec)
    if spec is None or embedding.fused:
        return None
    params: list[Tensor] = embedding.table_parameters()
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr)
    if spec.kind == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, eps=spec.eps)
    if spec.kind == "adam":  # the dense reference table (sparse=False) takes plain Adam
        adam = torch.optim.SparseAdam if getattr(embedding, "sparse", True) else torch.optim.Adam
        return adam(params, lr=spec.lr, eps=spec.eps)
    return RowWiseAdagrad(params, lr=spec.lr, eps=spec.eps)
