"""The interface both embedding backends implement, and what they share: the tables' optimiser
spec, their seeded initial weights, and one state layout (`tables.{i}` (V_i, e), `numeric`
(F_n, e)) so that weights move between backends and between worker counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hilomoe.schema import FeatureSchema

INIT_STD = 0.05
OptimizerKind = Literal["rowwise_adagrad", "adagrad", "adam", "sgd"]


@dataclass(frozen=True)
class TableOptimizer:
    """How the tables train in a stage: FBGEMM's exact (deduplicated) row updates, or the
    torch optimiser with the same update rule (engine/optimizers.py).

        sgd              w_i -= lr g_i
        adagrad          s_i += g_i^2 (per element);       w_i -= lr g_i / (sqrt(s_i) + eps)
        rowwise_adagrad  s_i += mean(g_i^2) (one per row);  w_i -= lr g_i / (sqrt(s_i) + eps)
        adam             Adam on the rows a batch touched

    with g_i the sum of row i's gradients over the batch; rows the batch did not use keep their
    weights and their optimiser state."""

    kind: OptimizerKind
    lr: float
    eps: float = 1e-8


def init_table(seed: int, index: int, rows: int, dim: int, device=None) -> Tensor:
    """Table `index`'s initial weights, N(0, 0.05^2), from a generator of its own: each rank
    draws only the tables it holds, and the draw does not depend on the backend."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.empty(rows, dim).normal_(0.0, INIT_STD, generator=g).to(device)


class FeatureEmbedding(nn.Module):
    """The interface of both backends (see the module docstring)."""

    fused = False  # True: the optimiser runs inside the backward pass (nothing to step)

    def __init__(self, schema: FeatureSchema, dim: int, seed: int = 0, device=None):
        super().__init__()
        self.schema, self.dim = schema, dim
        self.trainable = True
        self.numeric = nn.Parameter(init_table(seed, len(schema.vocab_sizes), schema.numeric,
                                               dim, device))

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tables = self.lookup(cat)  # (B, F_c * e)
        # (B, F_n * e); with no numeric field an empty product, still in the graph, so that DDP
        # sees a gradient for every parameter it was given
        numeric = (num.unsqueeze(-1) * self.numeric).flatten(1)
        return torch.cat([tables, numeric], dim=1)

    def lookup(self, cat: Tensor) -> Tensor:
        """cat: (B, F_c) -> (B, F_c * e), field by field."""
        raise NotImplementedError

    def join(self) -> None:
        """Take part in the other ranks' lookups with no rows (a rank whose evaluation shard ran
        out first: sharded lookups are collective). Nothing to do unless sharded."""

    @property
    def owned(self) -> list[int]:
        """The categorical fields whose tables this process holds."""
        return list(range(len(self.schema.vocab_sizes)))

    def tables(self) -> dict[int, Tensor]:
        """This process's tables by field: (V_i, e) views of the live weights."""
        raise NotImplementedError

    def table_parameters(self) -> list[nn.Parameter]:
        """Parameters a torch optimiser steps for the tables ([] when the update is fused)."""
        return []

    def configure(self, spec: TableOptimizer | None) -> None:
        """Before a stage: None freezes the tables; a fused backend builds its kernels for
        `spec` (and starts its optimiser state afresh, like every stage's optimiser)."""
        self.trainable = spec is not None

    # -- one state layout for every backend --------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "numeric"] = self.numeric if keep_vars else self.numeric.detach()
        for i, table in self.tables().items():
            destination[f"{prefix}tables.{i}"] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        known = {f"{prefix}tables.{i}" for i in range(len(self.schema.vocab_sizes))}
        known.add(prefix + "numeric")
        children = tuple(f"{prefix}{name}." for name in self._modules)
        for key in state_dict:  # tables held by other ranks are known, not unexpected
            if key.startswith(prefix) and key not in known and not key.startswith(children) \
                    and strict:
                unexpected_keys.append(key)
        targets = {"numeric": self.numeric, **{f"tables.{i}": t for i, t in self.tables().items()}}
        with torch.no_grad():
            for name, target in targets.items():
                value = state_dict.get(prefix + name)
                if value is None:
                    missing_keys.append(prefix + name)
                elif value.shape != target.shape:
                    error_msgs.append(f"size mismatch for {prefix + name}: the checkpoint has "
                                      f"{tuple(value.shape)}, the model {tuple(target.shape)}")
                else:
                    target.copy_(value)
