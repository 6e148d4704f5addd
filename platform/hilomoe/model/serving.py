"""The model as a served artefact: one table of named columns in, click probabilities out.

MLflow's pyfunc calls a PyTorch model with one tensor built from one table, so the two inputs
of `CTRModel` (category ids, numeric fields) travel as the columns of one float matrix: the
category ids first, in field order, then the numeric fields. The ids are exact as floats below
2^24 (16.7M ids per field).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hilomoe.model.ctr import CTRModel


class ServingModel(nn.Module):
    """forward(x: (B, F_cat + F_num)) -> click probability: (B,)."""

    def __init__(self, model: CTRModel):
        super().__init__()
        self.model = model
        self.categorical = len(model.schema.vocab_sizes)

    def forward(self, x: Tensor) -> Tensor:
        ids = x[:, :self.categorical].round().long()
        logit, _ = self.model(ids, x[:, self.categorical:].float())
        return torch.sigmoid(logit)


def serving_example(cat: np.ndarray, num: np.ndarray, names: list[str]):
    """A few rows as the table a served model takes (MLflow infers its signature from it).
    cat: (n, F_cat) ids, num: (n, F_num), names: the F_cat + F_num column names."""
    import pandas as pd

    columns = {name: cat[:, i].astype(np.int64) for i, name in enumerate(names[:cat.shape[1]])}
    columns.update({name: num[:, j].astype(np.float32)
                    for j, name in enumerate(names[cat.shape[1]:])})
    return pd.DataFrame(columns)
