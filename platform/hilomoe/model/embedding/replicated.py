"""The `torch` backend: every field in one nn.Embedding with per-field id offsets, sparse
gradients and a sparse torch optimiser (engine/optimizers.py), replicated on every worker.
`sparse=False` is the dense reference the equivalence tests compare against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hilomoe.model.embedding.base import FeatureEmbedding, init_table
from hilomoe.schema import FeatureSchema


class _Rows(nn.Embedding):
    """Every field's rows in one table. An nn.Embedding, so that DDP expects its sparse
    gradient; its owner saves and loads it, field by field."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass


class TorchEmbedding(FeatureEmbedding):
    """All fields in one (sum V_f, e) table; field f's ids are offset by sum_{g<f} V_g."""

    def __init__(self, schema: FeatureSchema, dim: int, seed: int = 0, device=None,
                 sparse: bool = True):
        super().__init__(schema, dim, seed, device)
        self.sparse = sparse
        weight = torch.cat([init_table(seed, i, v, dim) for i, v in enumerate(schema.vocab_sizes)])
        self.rows = _Rows(*weight.shape, sparse=sparse, _weight=weight.to(device))
        offsets = torch.tensor([0, *schema.vocab_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets.to(device), persistent=False)

    def lookup(self, cat: Tensor) -> Tensor:
        return self.rows(cat + self.offsets).flatten(1)

    def tables(self) -> dict[int, Tensor]:
        bounds = self.offsets.tolist() + [self.rows.weight.shape[0]]
        return {i: self.rows.weight[lo:hi] for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))}

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.rows.weight]
