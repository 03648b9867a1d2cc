"""Learned hash functions (Ghaemmaghami et al., "Learning to Collide"): an id → row mapping
learned from access frequency and a small embedding, so that the ids that share a row are
ones that behave alike.

A hash function makes arbitrary ids collide; a collision costs least when the two ids would
have learned similar vectors anyway. So, from the data's frequency statistics and a small
per-id embedding (trained in a short first phase, or read from a trained model): the most
frequent ids get rows of their own, the rest are clustered by frequency-weighted k-means on
the small embedding (on log-frequency where there is none: the collection builds without
one) into the remaining rows, and ids never seen hash into those cluster rows.
The mapping is two arrays (sorted ids, row per id) saved with the model; training and
serving read it the same way.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from embeddings import budget
from embeddings.mapping import Combiner, LearnedHashMapper
from embeddings.methods.base import CompressedEmbedding, FeatureStats, RowsOrRatioConfig

__all__ = [
    "LearnedHashConfig",
    "LearnedHashMapper",
    "fit_learned_hash",
    "weighted_kmeans",
]

# Distances are computed in chunks of at most this many (id, centroid) pairs.
_PAIRS_PER_CHUNK = 1 << 24


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
) -> torch.Tensor:
    """Cluster label in [0, k) of each point, by Lloyd's algorithm with weighted centroids.

    Centroids start at k distinct points drawn with probability ∝ weight (Gumbel top-k, so
    frequent ids are likely centres), and are weighted means of their points: frequent ids
    pull their cluster towards them, so rare ids collide with frequent ids like them. A
    cluster left empty is re-seeded at the point that costs most (weight × distance).

    Args:
        points: float [N, m].
        weights: non-negative [N] (access counts).
        k: clusters (k ≥ N gives every point its own).
        iters: Lloyd iterations at most (stops early when no label changes).
        seed: seed of the initial draw.
    """
    n = points.shape[0]
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    x = points.to(torch.float32)
    w = weights.to(torch.float32).clamp(min=0)
    gen = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(n, generator=gen).clamp(1e-12, 1 - 1e-7)))
    keys = torch.log(w.clamp(min=1e-30)) + gumbel
    centroids = x[torch.topk(keys, k).indices].clone()
    labels = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(max(1, iters)):
        new, dist = _assign(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
        mass = torch.zeros(k).index_add_(0, labels, w)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x * w[:, None])
        filled = mass > 0
        centroids[filled] = sums[filled] / mass[filled, None]
        empty = (~filled).nonzero().squeeze(1)
        # Zero-weight members leave a cluster "empty" too: re-seed those as well.
        counts = torch.bincount(labels, minlength=k)
        if empty.numel():
            cost = w * dist
            cost[counts[labels] == 1] = -1  # never take a point that is alone in its cluster
            take = torch.topk(cost, min(empty.numel(), n)).indices
            centroids[empty[: take.numel()]] = x[take]
    return labels


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point and the squared distance to it (chunked)."""
    c2 = (centroids * centroids).sum(1)
    chunk = max(1, _PAIRS_PER_CHUNK // max(1, centroids.shape[0]))
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        d = (xs * xs).sum(1, keepdim=True) - 2 * xs @ centroids.T + c2
        best, arg = d.min(1)
        labels.append(arg)
        dists.append(best.clamp(min=0))
    return torch.cat(labels), torch.cat(dists)


def fit_learned_hash(
    ids: np.ndarray,
    counts: np.ndarray,
    small_embeddings: np.ndarray | None,
    rows: int,
    hot_fraction: float,
    *,
    max_ids: int | None = None,
    iters: int = 20,
    seed: int = 0,
) -> LearnedHashMapper:
    """Learn the mapping of a `rows`-row table (the second phase of learned hashing).

    Args:
        ids: int64 [N] raw ids seen in the data (any order; ties in count keep this order).
        counts: int64 [N] occurrences of each id.
        small_embeddings: float [N, m] a small embedding per id, aligned with `ids`: from a
            short first training phase or a trained model's vectors (PCA-reduced).
            None clusters on log-frequency alone (ids of like popularity share rows).
        rows: rows of the table.
        hot_fraction: share of the rows given to the most frequent ids, one row each.
        max_ids: map at most this many ids (the most frequent); the rarer ones hash like
            unseen ids, which keeps the mapping arrays small. None = every id.
        iters: k-means iterations at most.
        seed: seed of the k-means start and of the hash for ids without a learned row.
    """
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    _check_fit_inputs(ids, counts, small_embeddings, rows, hot_fraction)
    order = np.argsort(-counts, kind="stable")
    if max_ids is not None:
        order = order[:max_ids]
    own = min(math.floor(rows * hot_fraction), order.shape[0])
    labels = np.empty(order.shape[0], dtype=np.int64)
    labels[:own] = np.arange(own)
    rest = order[own:]
    if rest.shape[0]:
        if own == rows:
            # No cluster rows left: the rest are not mapped and hash like unseen ids.
            order, labels = order[:own], labels[:own]
        else:
            labels[own:] = own + _cluster(rest, counts, small_embeddings, rows - own, iters, seed)
    mapped = ids[order]
    by_value = np.argsort(mapped, kind="stable")
    return LearnedHashMapper(
        rows,
        own,
        seed,
        torch.from_numpy(mapped[by_value]),
        torch.from_numpy(labels[by_value].astype(np.int32)),
    )


def _check_fit_inputs(
    ids: np.ndarray,
    counts: np.ndarray,
    small_embeddings: np.ndarray | None,
    rows: int,
    hot_fraction: float,
) -> None:
    if ids.ndim != 1 or ids.shape != counts.shape:
        raise ValueError(f"ids and counts must be 1-D of one length: {ids.shape}, {counts.shape}")
    if small_embeddings is not None and np.asarray(small_embeddings).shape[0] != ids.shape[0]:
        raise ValueError("small_embeddings must have one row per id")
    if not 0 <= hot_fraction <= 1 or rows < 1:
        raise ValueError(f"need rows ≥ 1 and hot_fraction in [0, 1]: {rows=} {hot_fraction=}")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise ValueError("ids must not repeat")


def _cluster(
    rest: np.ndarray,
    counts: np.ndarray,
    small_embeddings: np.ndarray | None,
    k: int,
    iters: int,
    seed: int,
) -> np.ndarray:
    """Cluster in [0, k) of the ids at positions `rest`: k-means on their small embeddings,
    or on log-frequency without them, weighted by their counts."""
    if small_embeddings is None:
        points = np.log1p(counts[rest].astype(np.float64))[:, None]
    else:
        points = np.asarray(small_embeddings, dtype=np.float32)[rest]
    cluster = weighted_kmeans(
        torch.as_tensor(points, dtype=torch.float32),
        torch.from_numpy(counts[rest].astype(np.float64)),
        k,
        iters,
        seed,
    )
    return cluster.numpy()


class LearnedHashConfig(RowsOrRatioConfig):
    """Learned hashing: frequent ids own rows, the rest share rows with similar ids.

    Needs the feature's frequency statistics (`stats` of `build`); the small embedding of the
    first phase is passed to `build` as `small_embeddings` (without one, ids are grouped by
    frequency alone).

    Args:
        ratio: compression ratio: ceil(n / ratio) rows.
        rows: the number of rows, instead of a ratio.
        hot_fraction: share of the rows that the most frequent ids own, one each.
        mapped_per_row: map at most this many ids per row (the most frequent); rarer ids hash
            into the cluster rows like unseen ones. None = map every id in the statistics.
        iters: k-means iterations at most.
        seed: seed of k-means and of the fallback hash.
    """

    method: Literal["learned_hash"] = "learned_hash"
    hot_fraction: float = Field(0.5, ge=0, le=1)
    mapped_per_row: float | None = Field(4.0, gt=0)
    iters: int = Field(20, ge=1)
    seed: int = Field(0, ge=0)




    def table_rows(self, num_embeddings: int) -> int:
        if self.rows is not None:
            return self.rows
        assert self.ratio is not None
        return budget.hash_rows(num_embeddings, self.ratio)

    def build(
        self,
        num_embeddings: int,
        dim: int,
        stats: FeatureStats | None = None,
        small_embeddings: np.ndarray | None = None,
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        if stats is None:
            raise ValueError(
                "learned_hash needs the feature's frequency statistics (stats): the mapping "
                "is learned from them"
            )
        rows = self.table_rows(num_embeddings)
        max_ids = None if self.mapped_per_row is None else math.ceil(self.mapped_per_row * rows)
        if torch.empty(0).is_meta:
            # Counting bytes only (a meta-device build): the arrays' sizes, not their content.
            m = len(stats.values) if max_ids is None else min(len(stats.values), max_ids)
            own = min(math.floor(rows * self.hot_fraction), m)
            if own == rows:
                m = own
            mapper = LearnedHashMapper(
                rows,
                own,
                self.seed,
                torch.empty(m, dtype=torch.int64),
                torch.empty(m, dtype=torch.int32),
            )
        else:
            mapper = fit_learned_hash(
                stats.values.numpy(),
                stats.counts.numpy(),
                small_embeddings,
                rows,
                self.hot_fraction,
                max_ids=max_ids,
                iters=self.iters,
                seed=self.seed,
            )
        return CompressedEmbedding(mapper, [rows], Combiner.SUM, dim, self.mlet_dim, self.sparse)
