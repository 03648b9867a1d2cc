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

from typing import Any, Literal

import torch
from pydantic import Field

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


class FullMapper(Mapper):
    """Known values → their own row; other values → hashed into the spare rows.

    Args:
        rows: rows of the table.
        values: int64 [m] known values, sorted ascending (m ≤ rows), or None.
        value_rows: int32 [m] the row of each known value.
        seed: hash seed for the values that have no row of their own.
    """

    kind = "full"

    def __init__(
        self,
        rows: int,
        values: torch.Tensor | None = None,
        value_rows: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.seed = seed
        self.known = 0 if values is None else int(values.shape[0])
        if self.known > rows:
            raise ValueError(f"{self.known} known values cannot own {rows} rows")
        if values is not None:
            self.register_buffer("values", values.to(torch.int64))
            self.register_buffer("value_rows", value_rows.to(torch.int32))

    @classmethod
    def from_vocabulary(
        cls, rows: int, vocabulary: torch.Tensor | None, seed: int = 0
    ) -> FullMapper:
        """The first `rows` values of `vocabulary` (most frequent first) own rows 0, 1, …"""
        if vocabulary is None or len(vocabulary) == 0:
            return cls(rows, seed=seed)
        top = torch.as_tensor(vocabulary, dtype=torch.int64)[:rows]
        values, order = torch.sort(top)
        if not values.is_meta and len(values) > 1 and bool((values[1:] == values[:-1]).any()):
            raise ValueError("the vocabulary holds a value twice")
        return cls(rows, values, order.to(torch.int32), seed)

    def forward(self, ids: torch.Tensor) -> Lookup:
        spare = self.rows - self.known
        if spare > 0:
            fallback = self.known + hash_bucket(ids, spare, self.seed)
        else:
            fallback = hash_bucket(ids, self.rows, self.seed)
        if not self.known:
            return Lookup(fallback[:, None])
        pos = torch.searchsorted(self.values, ids.contiguous()).clamp_(max=self.known - 1)
        hit = self.values[pos] == ids
        rows = torch.where(hit, self.value_rows[pos].to(torch.int64), fallback)
        return Lookup(rows[:, None])

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"rows": self.rows, "seed": self.seed}
        tensors = {"values": self.values, "value_rows": self.value_rows} if self.known else {}
        return config, tensors

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FullMapper:
        return cls(config["rows"], tensors.get("values"), tensors.get("value_rows"), config["seed"])


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
