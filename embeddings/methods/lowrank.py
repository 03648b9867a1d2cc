"""Low-rank compression of a trained model's embeddings: Atomic Feature Mimicking (AFM).

Paper: "Unified Low-rank Compression Framework for Click-through Rate Prediction"
(Yu et al., KDD 2024, arXiv 2405.18146; demo code yuhao318/Atomic_Feature_Mimicking).
From a trained model, collect each feature's *output* embeddings over the data, take their
mean μ and the top-k eigenvectors U_k of their covariance, store E' = (E − μ)U_k (n × k) and
a k → d linear layer with weight U_kᵀ and bias μ, then fine-tune the whole model. Since the
embeddings of a feature concentrate in a few directions, E'U_kᵀ + μ keeps most of their
variance (the explained variance Σ top-k eigenvalues / Σ all), at about d/k times fewer
table bytes.

What is changed, and why:
- "Over the data" is the feature's values in the data's statistics, each weighted by its
  count: that is exactly the distribution of the embeddings a pass over the training data
  would collect (every occurrence of a value yields its one embedding), without reading the
  data again. Without statistics every table row counts once (a one-table feature only).
- The trained feature may be any linear method (one table, hashing, CAFE's multi-level
  hash, QR by sum or concatenation): the paper's feature is one plain table. Where an id
  reads several rows (T_i read with 0/1 weights w_i) the centred form is not separable per
  table, so each table is projected alone, T_i U_k (for concatenation, its block of rows
  of U_k), with bias μ(I − U_k U_kᵀ): Σ w_i T_i U_k U_kᵀ + μ − μU_kU_kᵀ is the same
  reconstruction μ + (e − μ)U_kU_kᵀ of every output e. One plain table keeps the paper's
  centred form. QR by product is not linear and is refused.
- The trained feature's frozen mapper is this method's mapper (its ids read the rows they
  were trained on); the k×d projection and bias are dense parameters (Adam), the k-wide
  tables train like any table; the serving form keeps the projection and bias (folding
  them would make the tables d wide again).
- Size: `rank` k, or `ratio` ≈ d/k against the trained tables (k = floor(d / ratio)); a ratio
  beyond d (k < 1) is refused with the largest one, d.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from embeddings.mapping import Combiner, Mapper
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    TrainedFeature,
    TwoStageConfig,
)
from embeddings.serving_embedding import ServingEmbedding

__all__ = ["LowRankConfig", "collect_moments", "principal_axes"]

# Values whose embeddings are read per pass while collecting (bounds the memory of a pass).
_CHUNK = 1 << 16


class LowRankConfig(TwoStageConfig):
    """Low-rank (AFM): a rank-k projection from a trained model's embedding covariance.

    Args:
        rank: k, the width of the stored tables (k < d).
        ratio: instead of k: k = floor(d / ratio), about `ratio` times fewer table bytes
            than the trained tables (at most d, where k = 1).
    """

    method: Literal["lowrank"] = "lowrank"
    rank: int | None = Field(None, gt=0)
    ratio: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> LowRankConfig:
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give either rank or ratio, not both")
        if self.mlet_dim is not None:
            raise ValueError("lowrank holds its own k→d projection (k < d): MLET cannot "
                             "follow it; drop mlet_dim")
        return self

    def rank_for(self, dim: int) -> int:
        """k at width d (after `check`)."""
        if self.rank is not None:
            return self.rank
        return max(1, int(dim / self.ratio))

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.rank is None and self.ratio is None:
            raise ValueError("lowrank needs a size: set rank or ratio (or a collection ratio)")
        if self.ratio is not None and self.ratio > dim:
            raise ValueError(f"lowrank cannot reach ratio {self.ratio:g} at d={dim}: the "
                             f"largest is {dim} (k = 1)")
        if self.rank is not None and self.rank >= dim:
            raise ValueError(f"lowrank's rank k={self.rank} must be below d={dim}")
        if dim < 2:
            raise ValueError("lowrank needs d ≥ 2 (k < d)")

    def at_ratio(self, ratio: float) -> LowRankConfig:
        return self.model_copy(update={"ratio": ratio, "rank": None})

    def from_trained(
        self, num_embeddings: int, dim: int, trained: TrainedFeature
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        serving = trained.serving
        _check_trained(serving, dim)
        k = self.rank_for(dim)
        tables = [t.dequantize().to(torch.float64) for t in serving.tables]
        _, mean, second = collect_moments(serving, trained.stats)
        _, axes = principal_axes(mean, second)
        u = axes[:, :k]  # [d, k], largest eigenvalues first
        single = len(tables) == 1 and _reads_once(serving)
        if single:
            stored = [(tables[0] - mean) @ u]
            bias = mean
        else:
            blocks = _table_blocks(serving, tables, dim)
            stored = [t @ u[a:b] for t, (a, b) in zip(tables, blocks, strict=True)]
            bias = mean - (mean @ u) @ u.T
        mapper = Mapper.build(serving.mapper.kind, *_cloned(serving.mapper))
        emb = CompressedEmbedding(mapper, [t.shape[0] for t in stored], Combiner.SUM, dim,
                                  mlet_dim=k, sparse=self.sparse, low_rank=True)
        with torch.no_grad():
            for table, values in zip(emb.tables, stored, strict=True):
                table.copy_(values.to(table.dtype))
            emb.projection.copy_(u.T.to(emb.projection.dtype))
            emb.bias.copy_(bias.to(emb.bias.dtype))
        return emb


def _cloned(mapper: Mapper) -> tuple[dict, dict[str, torch.Tensor]]:
    config, tensors = mapper.export()
    return config, {name: t.clone() for name, t in tensors.items()}


def _check_trained(serving: ServingEmbedding, dim: int) -> None:
    if not isinstance(serving, ServingEmbedding):
        raise ValueError("lowrank needs the trained feature whole (one serving embedding); "
                         f"got a {type(serving).__name__} (a feature split over workers)")
    if serving.projection is not None:
        raise ValueError("the trained feature is already low-rank: train lowrank from a "
                         "model whose tables are d wide")
    if serving.combiner is Combiner.PRODUCT:
        raise ValueError("lowrank cannot project a trained feature with a product combiner "
                         "(QR by product): E·U only splits over tables through a linear "
                         "combiner")
    widths = [t.width for t in serving.tables]
    slots = _slots(serving)
    if len(widths) == 1 and slots > 1:
        # SCMA's one shared array, read at every slot: each slot's output columns project
        # through their own rows of U, so every slot would need a table of its own.
        raise ValueError(
            f"lowrank cannot project a feature whose one {widths[0]}-wide table is read at "
            f"{slots} slots (SCMA's shared array): each slot would need its own projected "
            f"table, {slots}×k values a row against the {widths[0]} it replaces; train "
            "lowrank from a model with d-wide tables (full, hash, learned_hash, CAFE, QR by "
            "sum)"
        )
    width = sum(widths) if serving.combiner is Combiner.CONCAT else max(widths)
    if width != dim or (serving.combiner is Combiner.SUM and min(widths) != dim):
        raise ValueError(f"the trained feature's tables are {widths} wide "
                         f"({serving.combiner.value}); this model's width is d={dim}")


def _slots(serving: ServingEmbedding) -> int:
    """Columns of a lookup: the tables (or slots of one shared table) an id reads."""
    return int(serving.mapper(torch.tensor([1], dtype=torch.int64)).rows.shape[1])


def _reads_once(serving: ServingEmbedding) -> bool:
    """Whether every id reads its one table exactly once (the paper's plain table)."""
    probe = torch.tensor([0, 1, 2**40, -1], dtype=torch.int64)
    return serving.mapper(probe).weights is None


def _table_blocks(serving: ServingEmbedding, tables: list[torch.Tensor],
                  dim: int) -> list[tuple[int, int]]:
    """The rows of U each table projects through: all d for a sum, its own columns of the
    output for a concatenation."""
    if serving.combiner is not Combiner.CONCAT:
        return [(0, dim)] * len(tables)
    out, start = [], 0
    for t in tables:
        out.append((start, start + t.shape[1]))
        start += t.shape[1]
    return out


@torch.no_grad()
def collect_moments(
    serving: ServingEmbedding, stats: FeatureStats | None
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(total weight W, mean μ [d], second moment Σ w e eᵀ / W [d, d]) of the feature's output
    embeddings: each value of `stats` weighted by its count, or every table row once when
    there are no statistics (a one-table feature). float64 throughout."""
    if stats is None or len(stats.values) == 0:
        if len(serving.tables) != 1:
            raise ValueError("lowrank needs the feature's statistics to collect the outputs "
                             "of a feature with several tables")
        e = serving.tables[0].dequantize().to(torch.float64)
        return float(e.shape[0]), e.mean(0), e.T @ e / e.shape[0]
    total = 0.0
    first = second = None
    for start in range(0, len(stats.values), _CHUNK):
        values = stats.values[start : start + _CHUNK]
        weights = stats.counts[start : start + _CHUNK].to(torch.float64)
        e = serving(values).to(torch.float64)
        s1 = weights @ e
        s2 = (e * weights[:, None]).T @ e
        first = s1 if first is None else first + s1
        second = s2 if second is None else second + s2
        total += float(weights.sum())
    return total, first / total, second / total


def principal_axes(mean: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending [d], eigenvectors as columns [d, d]) of the covariance."""
    cov = second - torch.outer(mean, mean)
    cov = (cov + cov.T) / 2  # exact symmetry for eigh
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(0), vectors.flip(1)
