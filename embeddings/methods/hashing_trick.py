"""Hashing trick (Weinberger et al.): every value hashed into ceil(n / ratio) shared rows.

The one hash of `embeddings.hashing` places values, so training and serving agree on every
machine. The simplest compression, and the baseline every other method is measured against.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from embeddings import budget
from embeddings.hashing import hash_bucket
from embeddings.methods.base import (
    Combiner,
    CompressedEmbedding,
    FeatureStats,
    Lookup,
    Mapper,
    RowsOrRatioConfig,
)


class HashMapper(Mapper):
    """id → hash(id) mod rows: stateless."""

    kind = "hash"

    def __init__(self, rows: int, seed: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.seed = seed

    def forward(self, ids: torch.Tensor) -> Lookup:
        return Lookup(hash_bucket(ids, self.rows, self.seed)[:, None])

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"rows": self.rows, "seed": self.seed}, {}

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HashMapper:
        return cls(config["rows"], config["seed"])


class HashConfig(RowsOrRatioConfig):
    """Hashing trick.

    Args:
        ratio: compression ratio: ceil(n / ratio) rows.
        rows: the number of rows, instead of a ratio.
        seed: hash seed.
    """

    method: Literal["hash"] = "hash"
    seed: int = 0




    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        rows = self.rows if self.rows is not None else budget.hash_rows(num_embeddings, self.ratio)
        mapper = HashMapper(rows, self.seed)
        return CompressedEmbedding(mapper, [rows], Combiner.SUM, dim, self.mlet_dim, self.sparse)
