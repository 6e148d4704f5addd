"""The input fields of a CTR dataset: a leaf that data, model and engine all read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSchema:
    """The input fields: one vocabulary size per categorical field, and a numeric field count."""

    vocab_sizes: tuple[int, ...]
    numeric: int = 0

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes) + self.numeric

    @property
    def embedding_rows(self) -> int:
        """Rows of every categorical table together."""
        return sum(self.vocab_sizes)
