"""Uncompressed embedding: one row per value, up to a cap (MLPerf's 40M is the reference).

Criteo values are raw 32-bit hashes, so "one row per value" needs an id → row map. With the
data's frequency statistics the most frequent `rows` values get rows of their own (a sorted
copy of them is searched); values beyond the cap and values never seen are folded by the
shared hash into the spare rows, or into all rows when there are none. Without statistics
the mapping is plain `hash(id) mod rows`: every row still exists, but distinct values may
collide (birthday collisions, about 37% of values when n values meet n rows), which is what
MLPerf's `id mod 40M` does too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from embeddings import budget
from embeddings.mapping import Combiner, FullMapper
from embeddings.methods.base import CompressedEmbedding, FeatureStats, MethodConfig

__all__ = ["FullConfig", "FullMapper"]


class FullConfig(MethodConfig):
    """Uncompressed: one row per value up to `cap`.

    Args:
        cap: most rows a table may have (values beyond it are folded by hash).
        ratio: optional compression ratio: rows = min(n, cap, ceil(n / ratio)), the top
            values by frequency keeping their own rows (frequency-capped vocabulary).
        seed: hash seed for folded and unseen values.

    With `stats`, the most frequent values own rows; without, rows are `hash(id) mod rows`.
    """

    method: Literal["full"] = "full"
    cap: int = Field(40_000_000, gt=0)
    ratio: float | None = Field(None, ge=1)
    seed: int = 0

    def at_ratio(self, ratio: float) -> FullConfig:
        # Uncompressed stays uncompressed under a collection-wide ratio; only an explicit
        # `ratio` on this config caps its vocabulary.
        return self

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        rows = budget.full_rows(num_embeddings, self.cap, self.ratio)
        vocabulary = stats.values if stats is not None else None
        mapper = FullMapper.from_vocabulary(rows, vocabulary, self.seed)
        return CompressedEmbedding(mapper, [rows], Combiner.SUM, dim, self.mlet_dim, self.sparse)
