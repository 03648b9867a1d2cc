"""Hashing trick (Weinberger et al.): every value hashed into ceil(n / ratio) shared rows.

The one hash of `embeddings.hashing` places values, so training and serving agree on every
machine. The simplest compression, and the baseline every other method is measured against.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from embeddings import budget
from embeddings.hashing import hash_bucket
from embeddings.methods.base import (
    Combiner,
    CompressedEmbedding,
    FeatureStats,
    Lookup,
    Mapper,
    MethodConfig,
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


class HashConfig(MethodConfig):
    """Hashing trick.

    Args:
        ratio: compression ratio: ceil(n / ratio) rows.
        rows: the number of rows, instead of a ratio.
        seed: hash seed.
    """

    method: Literal["hash"] = "hash"
    ratio: float | None = Field(None, ge=1)
    rows: int | None = Field(None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> HashConfig:
        if self.ratio is not None and self.rows is not None:
            raise ValueError("give either ratio or rows, not both")
        return self

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None and self.rows is None:
            raise ValueError("hash needs a size: set ratio or rows (or a collection ratio)")

    def at_ratio(self, ratio: float) -> HashConfig:
        return self.model_copy(update={"ratio": ratio, "rows": None})

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        rows = self.rows if self.rows is not None else budget.hash_rows(num_embeddings, self.ratio)
        mapper = HashMapper(rows, self.seed)
        return CompressedEmbedding(mapper, [rows], Combiner.SUM, dim, self.mlet_dim, self.sparse)
