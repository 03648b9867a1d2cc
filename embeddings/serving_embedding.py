"""The serving form of embeddings: a frozen mapper, plain d-wide tables, a combiner.

What `CompressedEmbedding.collapse` and `EmbeddingCollection.collapse` return and what a
model directory loads into: one `ServingEmbedding` per feature (or a `SplitServingEmbedding`
for a feature trained split over workers), gathered in a `ServingCollection`. Serving
imports this module, so it imports no training code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from embeddings.hashing import shard_of
from embeddings.mapping import Combiner, Mapper, combine
from embeddings.serving_tables import MixedServingTable, ServingTable


def check_ids(sparse: torch.Tensor, features: int) -> None:
    """Refuse a sparse input that is not [n, features]."""
    if sparse.dim() != 2 or sparse.shape[1] != features:
        raise ValueError(f"expected sparse ids [n, {features}], got {list(sparse.shape)}")


class ServingEmbedding(nn.Module):
    """The serving form: a frozen mapper, plain d-wide tables (maybe quantised), a combiner."""

    def __init__(
        self,
        mapper: Mapper,
        tables: list[torch.Tensor | ServingTable | MixedServingTable],
        combiner: Combiner,
    ) -> None:
        super().__init__()
        self.mapper = mapper
        self.combiner = combiner
        # Raw tensors are fp32 tables; anything else is already a serving table (any format).
        self.tables = nn.ModuleList(
            ServingTable.fp32(t) if isinstance(t, torch.Tensor) else t for t in tables
        )
        self.mapper.requires_grad_(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lookup = self.mapper(ids)
        vectors = []
        for t, table in enumerate(self.tables):
            v = table.lookup(lookup.rows[:, t])
            if lookup.weights is not None:
                v = v * lookup.weights[:, t : t + 1].to(v.dtype)
            vectors.append(v)
        return combine(vectors, self.combiner)

    def serving_bytes(self) -> int:
        """Mapper tensors plus every table tensor (data, scale, bias, tier ids)."""
        return self.mapper.state_bytes() + sum(t.nbytes() for t in self.tables)

    def quantize(self, fmt: str) -> ServingEmbedding:
        """A copy whose tables are stored row-wise in `fmt` (fp32, fp16, int8, int4).

        Per-row formats under a byte budget: `embeddings.methods.quantize`."""
        tables = [ServingTable.encode(t.dequantize(), fmt) for t in self.tables]
        return ServingEmbedding(self.mapper, tables, self.combiner)

    @torch.no_grad()
    def row_counts(self, values: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """How often each row of each table is read, given raw values and their counts."""
        lookup = self.mapper(torch.as_tensor(values, dtype=torch.int64))
        out = []
        for t, table in enumerate(self.tables):
            w = counts.to(torch.float64)
            if lookup.weights is not None:
                w = w * (lookup.weights[:, t] != 0)
            out.append(torch.bincount(lookup.rows[:, t], weights=w, minlength=table.rows))
        return out


class SplitServingEmbedding(nn.Module):
    """A feature trained split over workers by hash(id) mod shards: one part per shard."""

    def __init__(self, parts: list[ServingEmbedding], dim: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.dim = dim

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shard = shard_of(ids, len(self.parts))
        out = torch.zeros(ids.shape[0], self.dim, device=ids.device)
        for s, part in enumerate(self.parts):
            mask = shard == s
            if mask.any():
                out[mask] = part(ids[mask])
        return out

    def serving_bytes(self) -> int:
        return sum(p.serving_bytes() for p in self.parts)

    def quantize(self, fmt: str) -> SplitServingEmbedding:
        return SplitServingEmbedding([p.quantize(fmt) for p in self.parts], self.dim)


FeatureEmbedding = ServingEmbedding | SplitServingEmbedding


class ServingCollection(nn.Module):
    """The serving form of a collection: one ServingEmbedding per feature, no training state.

    Per-row formats under a byte budget: `embeddings.methods.quantize.quantize_collection_mixed`.
    """

    def __init__(self, names: list[str], embeddings: list[ServingEmbedding], dim: int) -> None:
        super().__init__()
        self.names = list(names)
        self.dim = dim
        self.embeddings = nn.ModuleDict(dict(zip(self.names, embeddings, strict=True)))

    @torch.no_grad()
    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        check_ids(sparse, len(self.names))
        # One transpose, so each feature reads a contiguous column (searchsorted, hashing).
        columns = sparse.t().contiguous()
        vectors = [emb(columns[j]) for j, emb in enumerate(self.embeddings.values())]
        return torch.stack(vectors, dim=1)

    def serving_bytes(self) -> int:
        return sum(emb.serving_bytes() for emb in self.embeddings.values())

    def quantize(self, fmt: str | Mapping[str, str]) -> ServingCollection:
        """Every table stored in `fmt` (one format, or one per feature name)."""
        fmts = fmt if isinstance(fmt, Mapping) else dict.fromkeys(self.names, fmt)
        return ServingCollection(
            self.names,
            [emb.quantize(fmts.get(name, "fp32")) for name, emb in self.embeddings.items()],
            self.dim,
        )
