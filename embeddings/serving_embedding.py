"""The serving form of embeddings: a frozen mapper, plain d-wide tables, a combiner.

One `ServingEmbedding` per feature (or a `SplitServingEmbedding` for a feature trained split
over workers): what `CompressedEmbedding.collapse` returns and what a model directory loads
into, read together by one `TableBatchedLookup` in the served model (`embeddings.serving`).
`EmbeddingCollection.collapse` gathers a collection's in a `ServingCollection`. Serving
imports this module, so it imports no training code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from embeddings.mapping import (
    Combiner,
    FullMapper,
    HashMapper,
    Lookup,
    Mapper,
    combine,
    hash_columns,
    seed_offsets,
    tensor_bytes,
)
from embeddings.serving_mpe import MpePackedTable
from embeddings.serving_tables import MixedServingTable, ServingTable
from idhash.splitmix import shard_of

# Known values of the uncompressed features mapped in one batched search are padded to the
# longest list; larger vocabularies keep their own search rather than pad every feature.
BATCHED_FULL_MAX = 1 << 16
_PAD = torch.iinfo(torch.int64).max


def check_ids(sparse: torch.Tensor, features: int) -> None:
    """Refuse a sparse input that is not [n, features]."""
    if sparse.dim() != 2 or sparse.shape[1] != features:
        raise ValueError(f"expected sparse ids [n, {features}], got {list(sparse.shape)}")


def shared_slots(tables: list, lookup: Lookup) -> list:
    """The table each column of a lookup reads: its own, or, where one table has several
    columns (SCMA's slots over its one shared array), that table at every column."""
    if len(tables) == 1 and lookup.rows.shape[1] > 1:
        return tables * lookup.rows.shape[1]
    return tables


class ServingEmbedding(nn.Module):
    """The serving form: a frozen mapper, plain d-wide tables (maybe quantised), a combiner.

    A low-rank feature (AFM) keeps k-wide tables (k < d) and its fp32 k×d `projection` and
    d-wide `bias` after the combiner: folded into the tables they would make them d wide
    again and undo the compression.
    """

    def __init__(
        self,
        mapper: Mapper,
        tables: list[torch.Tensor | ServingTable | MixedServingTable],
        combiner: Combiner,
        projection: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.mapper = mapper
        self.combiner = combiner
        # Raw tensors are fp32 tables; anything else is already a serving table (any format).
        self.tables = nn.ModuleList(
            ServingTable.fp32(t) if isinstance(t, torch.Tensor) else t for t in tables
        )
        self.mapper.requires_grad_(False)
        if (projection is None) != (bias is None):
            raise ValueError("a serving projection comes with its bias (low-rank)")
        self.projection: torch.Tensor | None
        self.bias: torch.Tensor | None
        self.register_buffer("projection", projection)
        self.register_buffer("bias", bias)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._combined(ids)
        if self.projection is None:
            return out
        return out @ self.projection + self.bias

    def _combined(self, ids: torch.Tensor) -> torch.Tensor:
        lookup = self.mapper(ids)
        vectors = []
        for t, table in enumerate(shared_slots(list(self.tables), lookup)):
            v = table.lookup(lookup.rows[:, t])
            if lookup.weights is not None:
                v = v * lookup.weights[:, t : t + 1].to(v.dtype)
            vectors.append(v)
        return combine(vectors, self.combiner)

    def serving_bytes(self) -> int:
        """Mapper tensors plus every table tensor (data, scale, bias, tier ids), plus a
        low-rank projection and bias."""
        kept = 0 if self.projection is None else tensor_bytes([self.projection, self.bias])
        return self.mapper.state_bytes() + sum(t.nbytes() for t in self.tables) + kept

    def quantize(self, fmt: str) -> ServingEmbedding:
        """A copy whose tables are stored row-wise in `fmt` (fp32, fp16, int8, int4).

        Per-row formats under a byte budget: `embeddings.methods.quantize`. MPE's packed
        codes are already its learned low-bit format and stay as they are."""
        tables = [t if isinstance(t, MpePackedTable) else ServingTable.encode(t.dequantize(), fmt)
                  for t in self.tables]
        return ServingEmbedding(self.mapper, tables, self.combiner, self.projection, self.bias)

    @torch.no_grad()
    def row_counts(self, values: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """How often each row of each table is read, given raw values and their counts."""
        lookup = self.mapper(torch.as_tensor(values, dtype=torch.int64))
        if len(self.tables) < lookup.rows.shape[1]:  # slots over one shared table (SCMA)
            rows = lookup.rows.reshape(-1)
            w = counts.to(torch.float64).repeat_interleave(lookup.rows.shape[1])
            return [torch.bincount(rows, weights=w, minlength=self.tables[0].rows)]
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


def _batchable(emb: nn.Module, dim: int) -> bool:
    """Read by the one table-batched call: fp32 d-wide tables whose vectors are summed."""
    return (isinstance(emb, ServingEmbedding) and emb.projection is None
            and (emb.combiner is Combiner.SUM or len(emb.tables) == 1)
            and all(isinstance(t, ServingTable) and t.fmt == "fp32" and t.width == dim
                    for t in emb.tables))


class TableBatchedLookup(nn.Module):
    """forward(sparse [n, F]) -> [n, F, d]: every feature's vectors from one lookup call.

    Serving a request feature by feature costs 26 mapper calls and 26 table reads of a few
    hundred ids each, whose per-call overhead was about half of a 256-row forward. Here the
    hash mappers of all features run as one vectorised pass (`hash_columns`), other mappers
    run once each over their column, and every fp32 table of every feature is read by one
    `embedding_bag` (per-table weights, sum) over one concatenated weight, as FBGEMM's TBE
    reads its tables. The per-feature tables become views into that weight, so memory is
    not doubled. Features it cannot batch (quantised tables, products, concatenations, split
    features) keep their own forward; the result is the same either way (tested).

    Args:
        embeddings: each feature's serving embedding, in the sparse input's column order.
        dim: the embedding width d.
    """

    def __init__(self, embeddings: list[nn.Module], dim: int) -> None:
        super().__init__()
        # Not registered as submodules: the model that owns them saves and moves them.
        self._embeddings = list(embeddings)
        self.dim = dim
        self.batched = [j for j, e in enumerate(embeddings) if _batchable(e, dim)]
        self.others = [j for j in range(len(embeddings)) if j not in self.batched]
        hashed = [j for j in self.batched if type(embeddings[j].mapper) is HashMapper]
        self._hashed = torch.tensor([self.batched.index(j) for j in hashed], dtype=torch.long)
        self._hashed_cols = torch.tensor(hashed, dtype=torch.long)
        self._seeds = seed_offsets([embeddings[j].mapper.seed for j in hashed])
        self._buckets = torch.tensor([embeddings[j].mapper.rows for j in hashed],
                                     dtype=torch.int64)
        full = [j for j in self.batched if type(embeddings[j].mapper) is FullMapper
                and embeddings[j].mapper.known <= BATCHED_FULL_MAX]
        self._full = _FullColumns([embeddings[j].mapper for j in full],
                                  [self.batched.index(j) for j in full], full)
        self._mapped = [j for j in self.batched if j not in hashed and j not in full]
        self._tables = [t for j in self.batched for t in embeddings[j].tables]
        self.tables_per_feature = max((len(embeddings[j].tables) for j in self.batched),
                                      default=1)
        self._weight: torch.Tensor | None = None
        self._pointers: list[int] = []

    def _pack(self) -> torch.Tensor:
        """The concatenated weight, (re)built when a table's storage changed (load, move)."""
        pointers = [t.data.data_ptr() for t in self._tables]
        if self._weight is not None and pointers == self._pointers:
            return self._weight
        weight = torch.cat([t.data for t in self._tables]) if self._tables else torch.empty(
            0, self.dim)
        start, offsets = 0, []
        for table in self._tables:
            offsets.append(start)
            table.data = weight[start:start + table.rows]
            start += table.rows
        self._weight, self._pointers = weight, [t.data.data_ptr() for t in self._tables]
        # Row 0 of each (feature, table) slot in the weight; unused slots weigh 0 anyway.
        base = torch.zeros(len(self.batched), self.tables_per_feature, dtype=torch.int64)
        at = 0
        for k, j in enumerate(self.batched):
            for t in range(len(self._embeddings[j].tables)):
                base[k, t] = offsets[at]
                at += 1
        self._base = base
        return weight

    @torch.no_grad()
    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        n, t_max = sparse.shape[0], self.tables_per_feature
        out = None
        if self.batched:
            weight = self._pack()
            rows = torch.zeros(n, len(self.batched), t_max, dtype=torch.int64,
                               device=sparse.device)
            weights = None if t_max == 1 else torch.zeros(n, len(self.batched), t_max,
                                                          device=sparse.device)
            if len(self._hashed):
                mapped = hash_columns(sparse[:, self._hashed_cols.to(sparse.device)],
                                      self._seeds.to(sparse.device),
                                      self._buckets.to(sparse.device))
                rows[:, self._hashed.to(sparse.device), 0] = mapped
                if weights is not None:
                    weights[:, self._hashed.to(sparse.device), 0] = 1.0
            if self._full.columns:
                k = self._full.positions.to(sparse.device)
                rows[:, k, 0] = self._full(sparse)
                if weights is not None:
                    weights[:, k, 0] = 1.0
            for j in self._mapped:
                k = self.batched.index(j)
                lookup = self._embeddings[j].mapper(sparse[:, j].contiguous())
                tables = lookup.rows.shape[1]
                rows[:, k, :tables] = lookup.rows
                if weights is not None:
                    weights[:, k, :tables] = (1.0 if lookup.weights is None
                                              else lookup.weights.to(weights.dtype))
            rows += self._base.to(sparse.device)[None]  # table rows → weight rows
            if weights is None:
                vectors = torch.nn.functional.embedding(rows.view(n, -1), weight)
            else:
                vectors = torch.nn.functional.embedding_bag(
                    rows.view(-1, t_max), weight, per_sample_weights=weights.view(-1, t_max),
                    mode="sum")
            vectors = vectors.view(n, len(self.batched), self.dim)
            if not self.others:
                return vectors
            out = torch.empty(n, len(self._embeddings), self.dim, device=sparse.device)
            out[:, self.batched] = vectors
        if out is None:
            out = torch.empty(n, len(self._embeddings), self.dim, device=sparse.device)
        for j in self.others:
            out[:, j] = self._embeddings[j](sparse[:, j].contiguous())
        return out


class _FullColumns:
    """The FullMapper of several features as one pass: a batched sorted search over the
    known values of all of them (padded to the longest list), one hash for the rest."""

    def __init__(self, mappers: list[FullMapper], positions: list[int],
                 columns: list[int]) -> None:
        self.columns = columns
        self.positions = torch.tensor(positions, dtype=torch.long)
        self._cols = torch.tensor(columns, dtype=torch.long)
        width = max([m.known for m in mappers] + [1])
        self.values = torch.full((len(mappers), width), _PAD, dtype=torch.int64)
        self.value_rows = torch.zeros(len(mappers), width, dtype=torch.int64)
        for i, m in enumerate(mappers):
            if m.known:
                self.values[i, :m.known] = m.values.cpu()
                self.value_rows[i, :m.known] = m.value_rows.cpu().to(torch.int64)
        known = torch.tensor([m.known for m in mappers], dtype=torch.int64)
        rows = torch.tensor([m.rows for m in mappers], dtype=torch.int64)
        spare = rows - known
        # As FullMapper.forward: unknown values hash into the spare rows, or all rows if none.
        self.buckets = torch.where(spare > 0, spare, rows)
        self.first = torch.where(spare > 0, known, torch.zeros_like(known))
        self.last = (known - 1).clamp(min=0)[:, None]
        self.has_known = (known > 0)[:, None]
        self.seeds = seed_offsets([m.seed for m in mappers])

    def __call__(self, sparse: torch.Tensor) -> torch.Tensor:
        """Rows [n, k] of the k columns of `sparse` [n, F] these mappers read."""
        device = sparse.device
        ids = sparse[:, self._cols.to(device)]
        fallback = self.first.to(device) + hash_columns(ids, self.seeds.to(device),
                                                        self.buckets.to(device))
        if not bool(self.has_known.any()):
            return fallback
        values = self.values.to(device)
        by_feature = ids.t().contiguous()
        pos = torch.minimum(torch.searchsorted(values, by_feature), self.last.to(device))
        hit = (values.gather(1, pos) == by_feature) & self.has_known.to(device)
        rows = torch.where(hit, self.value_rows.to(device).gather(1, pos), fallback.t())
        return rows.t()
