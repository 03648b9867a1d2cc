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
from typing import Any, Literal

import numba as nb
import numpy as np
import torch
from pydantic import Field

from embeddings import budget
from embeddings.hotsketch import PROMOTE, SLOTS, HotSketch, SketchEvents
from embeddings.mapping import Combiner, FrozenCafeMapper, tensor_bytes
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    MethodBytes,
    MethodConfig,
    gather,
)
from idhash.splitmix import hash64_scalar, seed_offset

__all__ = ["CafeConfig", "CafeEmbedding", "CafeMapper", "FrozenCafeMapper", "cafe_defaults"]

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


class CafeMapper(FrozenCafeMapper):
    """CAFE's live mapper: a HotSketch says which ids are hot (and their rows) or medium.

    Maps ids by the frozen form's rule (`embeddings.mapping.FrozenCafeMapper`, tables
    [hot, hash1, hash2]) with the sketch in place of the sorted id array, and exports that
    form: the sketch's hot and medium ids, sorted (`HotSketch.snapshot`). `Mapper.build`
    of its export (kind "cafe") gives the frozen mapper, which serving keeps.

    Args:
        sketch: the live sketch; its buckets and seed are the mapper's (they place hash1 rows).
        hot_rows: rows of the hot table.
        hash_rows: rows of each hash table.
    """

    def __init__(self, sketch: HotSketch, hot_rows: int, hash_rows: int) -> None:
        super().__init__(hot_rows, hash_rows, sketch.buckets, sketch.seed)
        self.sketch = sketch

    @property
    def frozen(self) -> bool:
        return False

    def classify(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hot row or -1, medium flag) of each id, as the sketch has them now."""
        cpu = ids.detach().to("cpu", torch.int64).contiguous()
        hot, medium = self.sketch.classify(cpu, self.hash(cpu).numpy())
        return hot.to(ids.device), medium.to(ids.device)

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        ids, rows = self.sketch.snapshot()
        return self.geometry(), {"ids": torch.from_numpy(ids), "rows": torch.from_numpy(rows)}

    def state_bytes(self) -> int:
        """Buffers plus every array of the sketch."""
        return tensor_bytes(self.buffers()) + self.sketch.nbytes()

    def serving_bytes(self) -> int:
        # Counted, not snapshotted: an id int64 and a row int32 per hot or medium id.
        return self.sketch.frozen_size() * (8 + 4)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        # The sketch is numpy state outside parameters and buffers; checkpoints carry it here.
        return {k: torch.from_numpy(v.copy()) for k, v in self.sketch.arrays().items()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            # A checkpoint loaded with map_location=cuda brings these to the GPU.
            self.sketch.load_arrays({k: v.cpu().numpy() for k, v in state.items()})


class CafeEmbedding(CompressedEmbedding):
    """A CAFE-compressed feature: hot table + two hash tables + HotSketch, summed (→ MLET).

    Every lookup goes through the mapper's rule (hot row, or hash1 row, plus the hash2 row
    of medium ids): alone through `CafeMapper`, inside a collection through the same rule
    in one numba pass per batch (`packed_lookup`) that also keeps each id's sketch hash for
    the update after the step. Importance is the L2 norm of the gradient of what each id
    read (k wide under MLET), taken from the gradient of the looked-up vectors.

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
        mapper = CafeMapper(sketch, hot_rows, hash_rows)
        # A zero-row hot table still needs a row to point the (weight-0) lookups at.
        rows = [max(1, hot_rows), hash_rows, hash_rows]
        super().__init__(mapper, rows, Combiner.SUM, dim, mlet_dim, sparse)
        self.mapper: CafeMapper
        # (ids, sketch hashes, hash2 rows of medium ids or -1, gradient norms) of each
        # training lookup since the last step.
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []
        self.last_key: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def sketch(self) -> HotSketch:
        assert self.mapper.sketch is not None
        return self.mapper.sketch

    @property
    def wants_gradient_norms(self) -> bool:
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bound:
            return super().forward(ids)  # refuses, with the reason
        out = gather(self.tables, self.mapper(ids), self.combiner, self.sparse)
        if self.training and out.requires_grad:
            cpu = ids.detach().to("cpu", torch.int64).contiguous()
            key = (cpu.numpy(), self.mapper.hash(cpu).numpy(), np.full(len(cpu), -1, np.int64))
            out.register_hook(lambda grad: self.observe_gradient_norms(grad.norm(dim=1), key))
        return out @ self.projection if self.projection is not None else out

    def packed_slots(self) -> int:
        return 2  # a primary row (hot or hash1) and, for medium ids, a hash2 row

    def packed_lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mapper's rule over a batch in one pass: [primary row, hash2 row] per id in the
        stacked [hot | hash1 | hash2] store table, the second read by medium ids only."""
        cpu = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        _, hash1_at, hash2_at = self.packed_row_offsets()
        sketch = self.sketch
        hashes, rows, mask, tags = _packed_rows_kernel(
            sketch.keys,
            sketch.scores,
            sketch.rows,
            cpu,
            seed_offset(self.mapper.seed),
            seed_offset(self.mapper.seed + 1),
            sketch.medium_fraction * sketch.threshold,
            self.mapper.hash_rows,
            hash1_at,
            hash2_at,
        )
        # Each medium id's hash2 row rides along to the sketch update as its tag, so a
        # promotion needs no hash to find the row it starts from.
        self.last_key = (cpu, hashes, tags) if self.training else None
        rows_t = torch.from_numpy(rows).to(ids.device, non_blocking=True)
        return rows_t, torch.from_numpy(mask).to(ids.device, non_blocking=True)

    def observe_gradient_norms(
        self, norms: torch.Tensor, key: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ) -> None:
        if key is not None:
            self._pending.append((*key, norms.detach()))

    def extra_state_bytes(self) -> int:
        return self.sketch.nbytes()

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Feed the batch's gradient norms to the sketch, then move the rows it re-assigned.

        Must follow every optimizer step of a training batch (the collection, the sharding
        router and the training loop call it): until then the batch's norms are held here.
        `optimizer` is the tables' optimizer of a method used alone; a method bound to a
        collection's store moves the store's optimizer state instead.
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

    def _event_rows(self, events: SketchEvents) -> tuple[np.ndarray, np.ndarray]:
        """Each event's hash1 row, and hash2 row where the id is medium (-1 elsewhere):
        from the hashes and tags the events carry, the mapper's rule for the rest."""
        hashes, h2, medium = events.hashes.copy(), events.tags.copy(), events.medium
        unknown = hashes < 0
        if unknown.any():
            hashes[unknown] = self.mapper.hash(torch.from_numpy(events.ids[unknown])).numpy()
        unknown = medium & (h2 < 0)
        if unknown.any():
            h2[unknown] = self.mapper.hash2_rows(torch.from_numpy(events.ids[unknown])).numpy()
        h2[~medium] = -1
        return self.mapper.hash1_rows(torch.from_numpy(hashes)).numpy(), h2

    def _state_pairs(
        self, optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(hot table's, hash1 table's) view of each row-shaped optimizer state, [rows, k];
        None for a side that has none yet (a fresh row there)."""
        if self.bound:
            return list(zip(self.table_row_states(0), self.table_row_states(1), strict=True))
        if optimizer is None:
            return []
        hot_t, hash1_t, _ = self.tables
        hot_state = optimizer.state.get(hot_t) or {}
        hash1_state = optimizer.state.get(hash1_t) or {}
        pairs = []
        for key in dict.fromkeys([*hot_state, *hash1_state]):
            a = _row_view(hot_state.get(key), hot_t)
            b = _row_view(hash1_state.get(key), hash1_t)
            if a is not None or b is not None:
                pairs.append((a, b))
        return pairs

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
        pairs = []
        for a, b in self._state_pairs(optimizer):
            if any(s is not None and (s.device.type != "cpu" or not s.is_contiguous())
                   for s in (a, b)):
                return False
            a_np = None if a is None else a.numpy()
            b_np = None if b is None else b.numpy()
            # A missing side is an empty array: the kernel zeroes rows it would copy.
            a_np = np.empty((0, b_np.shape[1]), b_np.dtype) if a_np is None else a_np
            b_np = np.empty((0, a_np.shape[1]), a_np.dtype) if b_np is None else b_np
            if a_np.dtype != b_np.dtype or a_np.shape[1] != b_np.shape[1]:
                return False
            pairs.append((a_np, b_np))
        h1, h2 = self._event_rows(events)
        hot, hash1, hash2 = (t.detach().numpy() for t in tables)
        _migrate_tables(hot, hash1, hash2, events.kind, events.rows, h1, h2)
        for a_np, b_np in pairs:
            _migrate_rows(a_np, b_np, events.kind, events.rows, h1)
        return True

    @torch.no_grad()
    def _migrate_tensors(
        self, events: SketchEvents, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """`migrate` with tensor ops, on any device. Consecutive events of one kind touch
        distinct hot rows, so each run of them is applied at once."""
        hot_t, hash1_t, hash2_t = self.tables
        device = hot_t.device
        h1_np, h2_np = self._event_rows(events)
        h1 = torch.from_numpy(h1_np).to(device)
        rows = torch.from_numpy(events.rows).to(device)
        medium = h2_np >= 0
        # The hash2 vector each medium id reads beside its hash1 row.
        medium_at = torch.from_numpy(np.flatnonzero(medium)).to(device)
        second = hash2_t.index_select(0, torch.from_numpy(h2_np[medium]).to(device))
        pairs = self._state_pairs(optimizer)
        kinds = events.kind
        bounds = [0, *(np.flatnonzero(np.diff(kinds)) + 1).tolist(), len(events)]
        for a, b in itertools.pairwise(bounds):
            r, h = rows[a:b], h1[a:b]
            promote = kinds[a] == PROMOTE
            vectors = hash1_t.index_select(0, h) if promote else hot_t.index_select(0, r)
            if second.shape[0]:
                inside = (medium_at >= a) & (medium_at < b)
                sign = 1.0 if promote else -1.0
                vectors.index_add_(0, medium_at[inside] - a, second[inside], alpha=sign)
            if promote:
                hot_t.index_copy_(0, r, vectors)
            else:
                # Two ids demoted onto one hash1 row: the later one's vector is kept there.
                hash1_t.index_copy_(0, h, vectors)
            for hot_state, hash1_state in pairs:
                src, dst = (hash1_state, hot_state) if promote else (hot_state, hash1_state)
                src_rows, dst_rows = (h, r) if promote else (r, h)
                if dst is None:
                    continue
                if src is None:
                    dst[dst_rows] = 0
                else:
                    dst[dst_rows] = src[src_rows].to(dst.dtype)


def _row_view(value: Any, table: torch.Tensor) -> torch.Tensor | None:
    """An optimizer state tensor of `table` as a [rows, k] view; None unless row-shaped."""
    if not (isinstance(value, torch.Tensor) and value.dim() >= 1):
        return None
    if value.shape[0] != table.shape[0]:
        return None
    return value.view(value.shape[0], -1)


@nb.njit(cache=True)
def _packed_rows_kernel(keys, scores, rows, ids, offset, second_offset, medium_threshold,
                        hash_rows, hash1_at, hash2_at):
    """`CafeMapper`'s rule for a batch, in rows of the stacked [hot | hash1 | hash2] table:
    (sketch hashes, [primary, hash2] rows, which of them are read, hash2 row or -1)."""
    n = ids.shape[0]
    n_buckets = keys.shape[0]
    out = np.empty((n, 2), np.int64)
    read = np.zeros((n, 2), np.bool_)
    hashes = np.empty(n, np.int64)
    tags = np.full(n, -1, np.int64)
    for i in range(n):
        h = hash64_scalar(ids[i], offset)
        hashes[i] = h
        b = h % n_buckets
        first = hash1_at + (h // n_buckets) % hash_rows
        out[i, 1] = hash2_at
        read[i, 0] = True
        for k in range(keys.shape[1]):
            sc = scores[b, k]
            if sc > 0 and keys[b, k] == ids[i]:
                if rows[b, k] > 0:
                    first = rows[b, k] - 1
                elif sc >= medium_threshold:
                    t2 = hash64_scalar(ids[i], second_offset) % hash_rows
                    out[i, 1] = hash2_at + t2
                    read[i, 1] = True
                    tags[i] = t2
                break
        out[i, 0] = first
    return hashes, out, read, tags


@nb.njit(cache=True)
def _migrate_tables(hot, hash1, hash2, kinds, rows, h1, h2):
    """Apply promotions and demotions to the tables in event order (see
    `CafeEmbedding.migrate`); h2 is the hash2 row of a medium id, -1 otherwise."""
    for e in range(kinds.shape[0]):
        r = rows[e]
        t2 = h2[e]
        if kinds[e] == PROMOTE:
            for c in range(hot.shape[1]):
                hot[r, c] = hash1[h1[e], c] + hash2[t2, c] if t2 >= 0 else hash1[h1[e], c]
        else:
            # Two ids demoted onto one hash1 row: the later one's vector is kept there.
            for c in range(hot.shape[1]):
                hash1[h1[e], c] = hot[r, c] - hash2[t2, c] if t2 >= 0 else hot[r, c]


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


class CafeConfig(MethodConfig):
    """CAFE: HotSketch-ranked hot rows plus a multi-level hash for the rest.

    Args:
        hot_table: "per_feature": each feature its own hot table and sketch; "shared": one
            hot table and sketch for every shared CAFE feature of the collection, keyed by
            (feature, id), each feature bringing its hot rows to it (the artifact's default;
            `embeddings.methods.cafe_shared`).
        ratio: compression ratio; sizes the tables as the artifact does (`budget.cafe_rows`)
            and picks the default threshold and hash share. (The artifact's rule that
            features of at most 2000 / ratio values stay whole is the collection's
            `uniform` allocation.)
        threshold: sketch score at which an id becomes hot; default from the ratio.
        hash_share: share of the row budget given to the hash tables; default from the ratio.
        adaptive: CAFE+'s adaptive threshold (re-rank when 1.2 × hot rows ids are above it).
        medium_fraction: ids scoring at least this × threshold read two hash rows.
        decay: score decay factor (applied every buckets × threshold × 10 of inserted score).
        seed: hash seed.
    """

    method: Literal["cafe"] = "cafe"
    hot_table: Literal["per_feature", "shared"] = "per_feature"
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

    def planned_bytes(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None, fmt: str = "fp32"
    ) -> MethodBytes:
        """As built, with the frozen id map counted full: every sketch slot an id (8 B) and
        its row (4 B), the 48 B per hot row the artifact's formula reserves. A fresh
        sketch maps nothing yet, but a trained one fills its slots with hot and medium ids,
        and the budget must hold what is exported."""
        built = super().planned_bytes(num_embeddings, dim, stats, fmt)
        hot, _, _ = self.sizes(num_embeddings, dim)
        buckets = max(1, hot)  # CafeEmbedding's default: a bucket per hot row
        return MethodBytes(built.training, built.serving + buckets * SLOTS * (8 + 4))

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
        hot, hashed, threshold = self.sizes(num_embeddings, dim)
        cls = CafeEmbedding
        if self.hot_table == "shared":
            from embeddings.methods.cafe_shared import SharedCafeEmbedding

            cls = SharedCafeEmbedding
        return cls(
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
