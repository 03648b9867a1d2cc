"""CAFE (Zhang et al., SIGMOD 2024): hot ids get rows of their own, the rest share hash rows.

A HotSketch (`embeddings.hotsketch`) ranks a feature's ids by the L2 norm of their embedding
gradients while training. Ids holding a hot row read the hot table; ids scoring between
0.2 × threshold and the threshold read the sum of two hash tables (multi-level hash); the rest
read one hash table. Ids move between hot and hashed while training, their rows (and the
optimizer state of those rows) with them. For serving the sketch is frozen into a sorted id
array, so the serving form needs no sketch and scores exactly like the trained one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import numba as nb
import numpy as np
import torch
from pydantic import Field
from torch.autograd.function import once_differentiable

from embeddings import budget
from embeddings.hashing import hash64, hash64_scalar, hash_bucket, seed_offset
from embeddings.hotsketch import PROMOTE, HotSketch, SketchEvents
from embeddings.methods.base import (
    Combiner,
    CompressedEmbedding,
    FeatureStats,
    Lookup,
    Mapper,
    MethodConfig,
    tensor_bytes,
)

# The artifact's defaults per compression ratio: (threshold, share of the budget for hashing).
_DEFAULTS: tuple[tuple[float, float, float], ...] = (
    (2, 10.0, 0.7),
    (10, 20.0, 0.5),
    (100, 100.0, 0.3),
    (1000, 500.0, 0.2),
    (2000, 500.0, 0.1),
)


def cafe_defaults(ratio: float) -> tuple[float, float]:
    """(threshold, hash share) for a compression ratio: the artifact's entry at the largest
    listed ratio not above `ratio` (2×, 10×, 100×, 1000×, ≥2000×; below 2× as 2×)."""
    chosen = _DEFAULTS[0]
    for entry in _DEFAULTS:
        if ratio >= entry[0]:
            chosen = entry
    return chosen[1], chosen[2]


class CafeMapper(Mapper):
    """Raw ids → hot row, or one or two hash rows. Live (a HotSketch) or frozen (sorted ids).

    Tables: [hot, hash1, hash2]. Lookup weights: hot [1, 0, 0], medium [0, 1, 1],
    cold [0, 1, 0]. One hash h = hash64(id, seed) places an id twice: its sketch bucket is
    h mod buckets and its hash1 row (h div buckets) mod hash_rows, the part of h the bucket
    did not use; hash2 rows use the hash with seed + 1.

    Args:
        hot_rows: rows of the hot table.
        hash_rows: rows of each hash table.
        buckets: the sketch's bucket count (also places hash1 rows, so frozen mappers keep it).
        seed: hash seed.
        sketch: the live sketch (training), or None for a frozen mapper.
        frozen_ids: frozen form: int64 [m] ids that are hot or medium, sorted.
        frozen_rows: frozen form: int32 [m] hot row of each, -1 for medium.
    """

    kind = "cafe"

    def __init__(
        self,
        hot_rows: int,
        hash_rows: int,
        buckets: int,
        seed: int = 0,
        sketch: HotSketch | None = None,
        frozen_ids: torch.Tensor | None = None,
        frozen_rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if (sketch is None) == (frozen_ids is None):
            raise ValueError("a CafeMapper is either live (a sketch) or frozen (sorted ids)")
        if sketch is not None and (sketch.buckets != buckets or sketch.seed != seed):
            raise ValueError("the sketch must hash with the mapper's buckets and seed")
        self.hot_rows = hot_rows
        self.hash_rows = hash_rows
        self.buckets = buckets
        self.seed = seed
        self.sketch = sketch
        if frozen_ids is not None:
            self.register_buffer("frozen_ids", frozen_ids.to(torch.int64))
            self.register_buffer("frozen_rows", frozen_rows.to(torch.int32))

    @property
    def frozen(self) -> bool:
        return self.sketch is None

    def hash(self, ids: torch.Tensor) -> torch.Tensor:
        return hash64(ids, self.seed)

    def hash1_rows(self, hashes: torch.Tensor) -> torch.Tensor:
        return torch.div(hashes, self.buckets, rounding_mode="floor") % self.hash_rows

    def hash2_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return hash_bucket(ids, self.hash_rows, self.seed + 1)

    def classify(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hot row or -1, medium flag) of each id."""
        if self.sketch is not None:
            cpu = ids.detach().to("cpu", torch.int64).contiguous()
            hot, medium = self.sketch.classify(cpu, self.hash(cpu).numpy())
            return hot.to(ids.device), medium.to(ids.device)
        ids = ids.contiguous()
        m = self.frozen_ids.shape[0]
        if m == 0:
            hot = torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
            return hot, torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        pos = torch.searchsorted(self.frozen_ids, ids).clamp_(max=m - 1)
        found = self.frozen_ids[pos] == ids
        row = torch.where(found, self.frozen_rows[pos].to(torch.int64), -1)
        return row, found & (row < 0)

    def forward(self, ids: torch.Tensor) -> Lookup:
        hot, medium = self.classify(ids)
        is_hot = hot >= 0
        rows = torch.stack(
            [hot.clamp(min=0), self.hash1_rows(self.hash(ids)), self.hash2_rows(ids)], dim=1
        )
        weights = torch.stack([is_hot, ~is_hot, medium & ~is_hot], dim=1).to(torch.float32)
        return Lookup(rows, weights)

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "hot_rows": self.hot_rows,
            "hash_rows": self.hash_rows,
            "buckets": self.buckets,
            "seed": self.seed,
        }
        if self.sketch is None:
            return config, {"ids": self.frozen_ids, "rows": self.frozen_rows}
        ids, rows = self.sketch.snapshot()
        return config, {"ids": torch.from_numpy(ids), "rows": torch.from_numpy(rows)}

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CafeMapper:
        return cls(
            config["hot_rows"],
            config["hash_rows"],
            config["buckets"],
            config["seed"],
            frozen_ids=tensors["ids"],
            frozen_rows=tensors["rows"],
        )

    def state_bytes(self) -> int:
        """Buffers (frozen mapping) plus, while training, every array of the sketch."""
        sketch = self.sketch.nbytes() if self.sketch is not None else 0
        return tensor_bytes(self.buffers()) + sketch

    def serving_bytes(self) -> int:
        if self.sketch is None:
            return tensor_bytes(self.buffers())
        # Counted, not snapshotted: an id int64 and a row int32 per hot or medium id.
        return self.sketch.frozen_size() * (8 + 4)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        # The sketch is numpy state outside parameters and buffers; checkpoints carry it here.
        if self.sketch is None:
            return {}
        return {k: torch.from_numpy(v.copy()) for k, v in self.sketch.arrays().items()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.sketch is not None and state:
            # A checkpoint loaded with map_location=cuda brings these to the GPU.
            self.sketch.load_arrays({k: v.cpu().numpy() for k, v in state.items()})


class CafeEmbedding(CompressedEmbedding):
    """A CAFE-compressed feature: hot table + two hash tables + HotSketch, summed (→ MLET).

    Args:
        hot_rows: rows of the hot table (ids with a hot row read only it).
        hash_rows: rows of each of the two hash tables.
        dim: output width d.
        threshold: sketch score at which an id becomes hot (the adaptive threshold's floor).
        mlet_dim: MLET's k (> dim), or None.
        sparse: sparse table gradients.
        buckets: sketch buckets; default one per hot row (as in the artifact).
        adaptive: CAFE+'s adaptive threshold (False: the artifact's first-come promotion).
        medium_fraction: ids scoring in [medium_fraction × threshold, threshold) read two
            hash rows.
        decay: score decay factor, applied when buckets × threshold × decay_period of score
            has been inserted since the last decay.
        decay_period: see decay.
        seed: hash seed.
    """

    def __init__(
        self,
        hot_rows: int,
        hash_rows: int,
        dim: int,
        threshold: float,
        mlet_dim: int | None = None,
        sparse: bool = False,
        buckets: int | None = None,
        adaptive: bool = True,
        medium_fraction: float = 0.2,
        decay: float = 0.99,
        decay_period: float = 10.0,
        seed: int = 0,
    ) -> None:
        buckets = buckets if buckets is not None else max(1, hot_rows)
        sketch = HotSketch(
            buckets,
            hot_rows,
            threshold,
            medium_fraction=medium_fraction,
            decay=decay,
            decay_period=decay_period,
            adaptive=adaptive,
            seed=seed,
        )
        mapper = CafeMapper(hot_rows, hash_rows, buckets, seed, sketch)
        # A zero-row hot table still needs a row to point the (weight-0) lookups at.
        rows = [max(1, hot_rows), hash_rows, hash_rows]
        super().__init__(mapper, rows, Combiner.SUM, dim, mlet_dim, sparse)
        self.mapper: CafeMapper
        # (ids, sketch hashes, hash2 rows of medium ids, gradient norms) of each training
        # batch since the last step.
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []

    @property
    def sketch(self) -> HotSketch:
        assert self.mapper.sketch is not None
        return self.mapper.sketch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cpu = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        hashes, *route, tags = self.sketch.route(cpu, self.mapper.hash_rows, self.mapper.seed + 1)
        # Each medium id's hash2 row rides along to the sketch update as its tag, so a
        # promotion needs no hash to find the row it starts from.
        plan = _Plan(
            *(torch.from_numpy(a).to(ids.device, non_blocking=True) for a in route),
            sparse=self.sparse,
            # Gradient norms feed the sketch only from training steps.
            sink=self._pending if self.training else None,
            key=(cpu, hashes, tags),
        )
        out = _CafeLookup.apply(plan, *self.tables)
        return out @ self.projection if self.projection is not None else out

    def extra_state_bytes(self) -> int:
        return self.sketch.nbytes()

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Feed the batch's gradient norms to the sketch, then move the rows it re-assigned.

        Must follow every optimizer step of a training batch (the collection, the sharding
        router and the training loop call it): until then the batch's norms are held here.
        """
        pending, self._pending = self._pending, []
        for ids, hashes, tags, norms in pending:
            values = norms.to("cpu", torch.float32).numpy()
            mean = values.mean() if values.size else 0.0
            if not mean > 0:
                continue
            # Importance is relative within a batch (mean 1), as in the artifact.
            events = self.sketch.update_arrays(ids, hashes, values / mean, tags)
            if len(events):
                self.migrate(events, optimizer)

    @torch.no_grad()
    def migrate(self, events: SketchEvents, optimizer: torch.optim.Optimizer | None) -> None:
        """Apply the sketch's promotions and demotions to the tables, in order.

        Promotion: the hot row starts as the id's current vector (its hash1 row, plus its
        hash2 row if it was medium). Demotion: the hot row is copied back into the id's hash1
        row (less its hash2 row if it is now medium), so the id reads exactly what it learned
        and no row is left zero. Each row's optimizer state goes the same way (hash1's ↔ the
        hot row's). CPU tables take numba kernels; others, tensor ops (`_migrate_tensors`).
        """
        if not len(events):
            return
        if not self._migrate_on_cpu(events, optimizer):
            self._migrate_tensors(events, optimizer)

    @torch.no_grad()
    def _migrate_on_cpu(
        self, events: SketchEvents, optimizer: torch.optim.Optimizer | None
    ) -> bool:
        """`migrate` as numba kernels over the tables and row states in place: one call
        each instead of a dozen small tensor ops per run of events (the per-step cost of
        CAFE's migrations). False, having changed nothing, where the tables or a state are
        not plain contiguous CPU float32 arrays; `_migrate_tensors` handles those."""
        tables = list(self.tables)
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tables):
            return False
        hot_t, hash1_t, _ = tables
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        if optimizer is not None:
            hot_state = optimizer.state.get(hot_t) or {}
            hash1_state = optimizer.state.get(hash1_t) or {}
            for key in dict.fromkeys([*hot_state, *hash1_state]):
                a = _row_state(hot_state.get(key), hot_t)
                b = _row_state(hash1_state.get(key), hash1_t)
                if a is False or b is False:
                    return False
                if a is None and b is None:
                    continue
                # A missing side is an empty array: the kernel zeroes rows it would copy.
                a = np.empty((0, b.shape[1]), b.dtype) if a is None else a
                b = np.empty((0, a.shape[1]), a.dtype) if b is None else b
                if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
                    return False
                pairs.append((a, b))
        hot, hash1, hash2 = (t.detach().numpy() for t in tables)
        h1 = _migrate_tables(
            hot,
            hash1,
            hash2,
            events.kind,
            events.ids,
            events.rows,
            events.medium,
            events.hashes,
            events.tags,
            seed_offset(self.mapper.seed),
            seed_offset(self.mapper.seed + 1),
            self.mapper.buckets,
        )
        for a, b in pairs:
            _migrate_rows(a, b, events.kind, events.rows, h1)
        return True

    @torch.no_grad()
    def _migrate_tensors(
        self, events: SketchEvents, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """`migrate` with tensor ops, on any device. Consecutive events of one kind touch
        distinct hot rows, so each run of them is applied at once."""
        hot_t, hash1_t, hash2_t = self.tables
        device = hot_t.device
        # Hashes and hash2 rows come with events from inserting the id; compute the others.
        hashes, h2, medium = events.hashes.copy(), events.tags.copy(), events.medium
        unknown = hashes < 0
        if unknown.any():
            hashes[unknown] = self.mapper.hash(torch.from_numpy(events.ids[unknown])).numpy()
        unknown = medium & (h2 < 0)
        if unknown.any():
            h2[unknown] = self.mapper.hash2_rows(torch.from_numpy(events.ids[unknown])).numpy()
        h1 = self.mapper.hash1_rows(torch.from_numpy(hashes)).to(device)
        rows = torch.from_numpy(events.rows).to(device)
        # The hash2 vector each medium id reads beside its hash1 row.
        medium_at = torch.from_numpy(np.flatnonzero(medium)).to(device)
        second = hash2_t.index_select(0, torch.from_numpy(h2[medium]).to(device))
        kinds = events.kind
        bounds = [0, *(np.flatnonzero(np.diff(kinds)) + 1).tolist(), len(events)]
        for a, b in itertools.pairwise(bounds):
            r, h = rows[a:b], h1[a:b]
            if kinds[a] == PROMOTE:
                vectors = hash1_t.index_select(0, h)
            else:
                vectors = hot_t.index_select(0, r)
            if second.shape[0]:
                inside = (medium_at >= a) & (medium_at < b)
                sign = 1.0 if kinds[a] == PROMOTE else -1.0
                vectors.index_add_(0, medium_at[inside] - a, second[inside], alpha=sign)
            if kinds[a] == PROMOTE:
                hot_t.index_copy_(0, r, vectors)
                _move_state(optimizer, hash1_t, h, hot_t, r)
            else:
                # Two ids demoted onto one hash1 row: the later one's vector is kept there.
                hash1_t.index_copy_(0, h, vectors)
                _move_state(optimizer, hot_t, r, hash1_t, h)


def _row_state(value: Any, table: torch.Tensor) -> np.ndarray | bool | None:
    """An optimizer state tensor of `table` as a [rows, width] array sharing its memory;
    None if it is not row-shaped (or absent), False if it is but cannot be shared so."""
    if not (isinstance(value, torch.Tensor) and value.dim() >= 1):
        return None
    if value.shape[0] != table.shape[0]:
        return None
    if value.device.type != "cpu" or not value.is_contiguous():
        return False
    return value.view(value.shape[0], -1).numpy()


@nb.njit(cache=True)
def _migrate_tables(hot, hash1, hash2, kinds, ids, rows, medium, hashes, tags, offset,
                    second_offset, buckets):
    """Apply promotions and demotions to the tables in event order (see
    `CafeEmbedding.migrate`); returns each event's hash1 row for the state kernel. Events
    from a re-rank or decay carry no hash or tag (-1): those are hashed here."""
    n_rows = hash1.shape[0]
    h1 = np.empty(kinds.shape[0], np.int64)
    for e in range(kinds.shape[0]):
        h = hashes[e] if hashes[e] >= 0 else hash64_scalar(ids[e], offset)
        h1[e] = (h // buckets) % n_rows
        r = rows[e]
        t2 = -1
        if medium[e]:
            t2 = tags[e] if tags[e] >= 0 else hash64_scalar(ids[e], second_offset) % n_rows
        if kinds[e] == PROMOTE:
            for c in range(hot.shape[1]):
                hot[r, c] = hash1[h1[e], c] + hash2[t2, c] if t2 >= 0 else hash1[h1[e], c]
        else:
            # Two ids demoted onto one hash1 row: the later one's vector is kept there.
            for c in range(hot.shape[1]):
                hash1[h1[e], c] = hot[r, c] - hash2[t2, c] if t2 >= 0 else hot[r, c]
    return h1


@nb.njit(cache=True)
def _migrate_rows(hot_state, hash1_state, kinds, rows, h1):
    """Move one row-shaped optimizer state the way its rows moved: hash1's to the hot row
    on promotion, back on demotion; an empty side (no state) reads as zeros."""
    has_hot = hot_state.shape[0] > 0
    has_hash1 = hash1_state.shape[0] > 0
    for e in range(kinds.shape[0]):
        r, h = rows[e], h1[e]
        if kinds[e] == PROMOTE and has_hot:
            for c in range(hot_state.shape[1]):
                hot_state[r, c] = hash1_state[h, c] if has_hash1 else 0
        elif kinds[e] != PROMOTE and has_hash1:
            for c in range(hash1_state.shape[1]):
                hash1_state[h, c] = hot_state[r, c] if has_hot else 0


@dataclass
class _Plan:
    """Where one batch reads (see `HotSketch.route`)."""

    hot_rows: torch.Tensor
    hash1_rows: torch.Tensor
    inverse: torch.Tensor
    medium_at: torch.Tensor
    hash2_rows: torch.Tensor
    sparse: bool
    sink: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] | None
    key: tuple[np.ndarray, np.ndarray, np.ndarray]


class _CafeLookup(torch.autograd.Function):
    """Read each id's rows and sum them, in one autograd node.

    Forward reads each distinct primary row once (hot rows, then hash1 rows) into a small
    buffer, expands it to batch order with one gather, and adds the hash2 rows of medium
    ids. Backward sums the gradient per distinct row with one index_add, so the hot and
    hash1 tables get coalesced sparse gradients (sorted distinct rows; the optimizer's
    coalesce then costs nothing) over exactly the rows read, and hash2 the medium ids'
    rows. The per-id gradient norm (the HotSketch importance: the gradient of what the id
    read, k wide under MLET) goes to the plan's sink.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        plan: _Plan,
        hot_t: torch.Tensor,
        hash1_t: torch.Tensor,
        hash2_t: torch.Tensor,
    ) -> torch.Tensor:
        n_hot = plan.hot_rows.shape[0]
        rows = hash1_t.new_empty(n_hot + plan.hash1_rows.shape[0], hash1_t.shape[1])
        torch.index_select(hot_t, 0, plan.hot_rows, out=rows[:n_hot])
        torch.index_select(hash1_t, 0, plan.hash1_rows, out=rows[n_hot:])
        out = rows.index_select(0, plan.inverse)
        if plan.medium_at.numel():
            out.index_add_(0, plan.medium_at, hash2_t.index_select(0, plan.hash2_rows))
        ctx.plan = plan
        ctx.shapes = (hot_t.shape, hash1_t.shape, hash2_t.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        if plan.sink is not None:
            plan.sink.append((*plan.key, grad.norm(dim=1)))
        n_hot = plan.hot_rows.shape[0]
        per_row = grad.new_zeros(n_hot + plan.hash1_rows.shape[0], grad.shape[1])
        per_row.index_add_(0, plan.inverse, grad)
        parts = (
            (plan.hot_rows, per_row[:n_hot], True),
            (plan.hash1_rows, per_row[n_hot:], True),
            (plan.hash2_rows, grad.index_select(0, plan.medium_at), False),
        )
        grads: list[torch.Tensor | None] = [None]
        for (rows, values, coalesced), shape, needed in zip(
            parts, ctx.shapes, ctx.needs_input_grad[1:], strict=True
        ):
            if not needed or not rows.numel():
                # Not read: no gradient at all (an empty sparse one trips row-wise optimizers).
                grads.append(None)
            elif plan.sparse:
                grads.append(
                    torch.sparse_coo_tensor(
                        rows.unsqueeze(0),
                        values,
                        shape,
                        check_invariants=False,
                        is_coalesced=coalesced,
                    )
                )
            else:
                grads.append(values.new_zeros(shape).index_add_(0, rows, values))
        return tuple(grads)


def _move_state(
    optimizer: torch.optim.Optimizer | None,
    src: torch.Tensor,
    src_rows: torch.Tensor,
    dst: torch.Tensor,
    dst_rows: torch.Tensor,
) -> None:
    """Copy the row-shaped optimizer state of `src_rows` onto `dst_rows`; where `src` has
    none yet, reset the destination rows to zero (a fresh row)."""
    if optimizer is None:
        return
    dst_state = optimizer.state.get(dst)
    if not dst_state:
        return
    src_state = optimizer.state.get(src) or {}
    for key, target in dst_state.items():
        if not (isinstance(target, torch.Tensor) and target.dim() >= 1):
            continue
        if target.shape[0] != dst.shape[0]:
            continue
        value = src_state.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == src.shape[0]:
            target[dst_rows] = value[src_rows].to(target.dtype)
        else:
            target[dst_rows] = 0


class CafeConfig(MethodConfig):
    """CAFE: HotSketch-ranked hot rows plus a multi-level hash for the rest.

    Args:
        ratio: compression ratio; sizes the tables as the artifact does (`budget.cafe_rows`)
            and picks the default threshold and hash share. Features with at most
            2000 / ratio values stay uncompressed.
        threshold: sketch score at which an id becomes hot; default from the ratio.
        hash_share: share of the row budget given to the hash tables; default from the ratio.
        adaptive: CAFE+'s adaptive threshold (re-rank when 1.2 × hot rows ids are above it).
        medium_fraction: ids scoring at least this × threshold read two hash rows.
        decay: score decay factor (applied every buckets × threshold × 10 of inserted score).
        seed: hash seed.
    """

    method: Literal["cafe"] = "cafe"
    ratio: float | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0)
    hash_share: float | None = Field(None, gt=0, lt=1)
    adaptive: bool = True
    medium_fraction: float = Field(0.2, ge=0, le=1)
    decay: float = Field(0.99, gt=0, le=1)
    seed: int = Field(0, ge=0)

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None:
            raise ValueError("cafe needs a size: set ratio (or a collection ratio)")

    def at_ratio(self, ratio: float) -> CafeConfig:
        return self.model_copy(update={"ratio": ratio})

    def sizes(self, num_embeddings: int, dim: int) -> tuple[int, int, float]:
        """(hot rows, rows of each hash table, threshold) at this config's ratio."""
        assert self.ratio is not None
        threshold, share = cafe_defaults(self.ratio)
        share = self.hash_share if self.hash_share is not None else share
        hot, hashed = budget.cafe_rows(num_embeddings, self.ratio, share, dim)
        return hot, hashed, self.threshold if self.threshold is not None else threshold

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        assert self.ratio is not None
        if budget.stays_uncompressed(num_embeddings, self.ratio):
            from embeddings.methods.full import FullConfig

            full = FullConfig(mlet_dim=self.mlet_dim, sparse=self.sparse, seed=self.seed)
            return full.build(num_embeddings, dim, stats)
        hot, hashed, threshold = self.sizes(num_embeddings, dim)
        return CafeEmbedding(
            hot,
            hashed,
            dim,
            threshold,
            mlet_dim=self.mlet_dim,
            sparse=self.sparse,
            adaptive=self.adaptive,
            medium_fraction=self.medium_fraction,
            decay=self.decay,
            seed=self.seed,
        )
