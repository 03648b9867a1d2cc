"""Hashing trick (Weinberger et al.): every value hashed into ceil(n / ratio) shared rows.

The one hash of `idhash.splitmix` places values, so training and serving agree on every
machine. The simplest compression, and the baseline every other method is measured against.
"""

from __future__ import annotations

from typing import Literal

from embeddings import budget
from embeddings.mapping import Combiner, HashMapper
from embeddings.methods.base import CompressedEmbedding, FeatureStats, RowsOrRatioConfig

__all__ = ["HashConfig", "HashMapper"]


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
