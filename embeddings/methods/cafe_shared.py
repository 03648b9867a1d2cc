"""CAFE with one hot table and one HotSketch for every CAFE feature of a collection.

The CAFE artifact's default: hot rows go to whichever (feature, id) pairs matter most, not a
fixed number per feature, so a 64-value feature whose values are all frequent can hold most
of them while a 40M-value feature keeps only its head. Each feature keeps its own two hash
tables; the sketch is keyed by (feature, id), packed into one int64 key (the feature in the
top byte, the id's low 56 bits below; ids must lie in [-2^55, 2^55), as Criteo's 32-bit
hashes and the missing value -1 do).

A `SharedCafeEmbedding` alone is per-feature CAFE (planned bytes, tests); a collection joins
its shared features into one `CafeGroup`. The group's hot table is its own table-batched
store (one bag per sample and feature), so its update is fused like the others; each member's
hash1/hash2 tables sit in the collection's store. Sharded, the hot table and sketch are
partitioned row-wise by the worker each feature (shard) was planned on, which is where the
router sends its ids; a relocated plan keeps those groups, so one worker trains the same
model as N. Collapse gives every feature today's serving form
(its hot ids with a compact hot table of their rows, its hash tables), so serving is
unchanged and scores exactly as training does.
"""

from __future__ import annotations

import itertools

import numba as nb
import numpy as np
import torch
from torch import nn

from embeddings.hotsketch import HotSketch, SketchEvents
from embeddings.mapping import FrozenCafeMapper, Mapper, tensor_bytes
from embeddings.methods.cafe import CafeEmbedding
from embeddings.tables import Backend, TableOptimizer, TableSpec, build_store
from idhash.splitmix import hash64_scalar, seed_offset

_ID_BITS = 56
_ID_MASK = (1 << _ID_BITS) - 1
MAX_MEMBERS = 126  # the key's top byte holds member + 1 and must keep the key positive
# The group sketch's seed (its bucket hash of the keys).
_GROUP_SEED = 0x5EED


def member_keys(ids: np.ndarray, member: int) -> np.ndarray:
    """The sketch keys of one member's ids: (member + 1) in the top byte, the id below."""
    return ((member + 1) << _ID_BITS) | (ids & _ID_MASK)


def key_ids(keys: np.ndarray) -> np.ndarray:
    """The ids back from keys (the low 56 bits, sign-extended)."""
    low = keys & _ID_MASK
    return np.where(low >= 1 << (_ID_BITS - 1), low - (1 << _ID_BITS), low)


def key_members(keys: np.ndarray) -> np.ndarray:
    return (keys >> _ID_BITS) - 1


class SharedCafeEmbedding(CafeEmbedding):
    """A CAFE feature that shares its collection's hot table and sketch (see module doc).

    Its own hot table (`hot_rows`, which it adds to the group's) and sketch serve only
    until a collection joins it to a group: then `tables[0]` is the group's whole hot
    table, its lookups read hot rows there and its hash rows in the collection's store.
    """

    group: CafeGroup | None = None
    member: int = -1

    @property
    def joined(self) -> bool:
        return self.group is not None

    # -- packing ---------------------------------------------------------------------------

    def packed_specs(self) -> list[tuple[int, int]]:
        if not self.joined:
            return super().packed_specs()
        hash1, hash2 = self.tables[1], self.tables[2]
        return [(hash1.shape[0] + hash2.shape[0], hash1.shape[1])]

    def packed_row_offsets(self) -> list[int]:
        if not self.joined:
            return super().packed_row_offsets()
        return [0, self.tables[1].shape[0]]

    def bind(self, store_tables: list[torch.Tensor]) -> None:
        if not self.joined:
            super().bind(store_tables)
            return
        (whole,) = store_tables
        rows = self.mapper.hash_rows
        assert self.group is not None
        del self.tables
        self.tables = [self.group.hot_table(), whole[:rows], whole[rows : 2 * rows]]

    def packed_lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[hash1 row, hash2 row] in the stacked [hash1 | hash2] store table, read unless the
        id is hot (hash1) or unless it is not medium (hash2); the hot rows wait for the
        group's lookup in `last_hot`."""
        if not self.joined:
            return super().packed_lookup(ids)
        assert self.group is not None
        cpu = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        sketch = self.group.sketch
        keys, hashes, hot, rows, mask, tags, ok = _shared_rows_kernel(
            sketch.keys, sketch.scores, sketch.rows, cpu, np.int64(self.member + 1),
            seed_offset(_GROUP_SEED), seed_offset(self.mapper.seed),
            seed_offset(self.mapper.seed + 1), sketch.medium_fraction * sketch.threshold,
            self.mapper.hash_rows, self.mapper.buckets,
        )
        if not ok:
            raise ValueError("CAFE with a shared hot table keys ids by their low 56 bits: "
                             "ids must lie in [-2^55, 2^55)")
        self.last_key = (keys, hashes, tags) if self.training else None
        self.last_hot = torch.from_numpy(hot).to(ids.device, non_blocking=True)
        rows_t = torch.from_numpy(rows).to(ids.device, non_blocking=True)
        return rows_t, torch.from_numpy(mask).to(ids.device, non_blocking=True)

    # -- after the step: the group updates the sketch once for all members ---------------

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self.joined:
            super().after_step(optimizer)

    def take_pending(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]]:
        pending, self._pending = self._pending, []
        return pending

    def _event_rows(self, events: SketchEvents) -> tuple[np.ndarray, np.ndarray]:
        if not self.joined:
            return super()._event_rows(events)
        ids = torch.from_numpy(key_ids(events.ids))
        h1 = self.mapper.hash1_rows(self.mapper.hash(ids)).numpy()
        h2 = events.tags.copy()
        medium = events.medium
        unknown = medium & (h2 < 0)
        if unknown.any():
            h2[unknown] = self.mapper.hash2_rows(ids[torch.from_numpy(unknown)]).numpy()
        h2[~medium] = -1
        return h1, h2

    def _state_pairs(
        self, optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        if not self.joined:
            return super()._state_pairs(optimizer)
        assert self.group is not None
        rows = self.mapper.hash_rows
        hot = self.group.store.row_states(0)
        hash1 = [s[:rows] for s in self._store_row_states(0)]
        if len(hot) != len(hash1) or any(a.shape[1:] != b.shape[1:]
                                         for a, b in zip(hot, hash1, strict=True)):
            return []  # optimizer states that do not pair up row for row: rows move alone
        return list(zip(hot, hash1, strict=True))

    # -- bytes and collapse ----------------------------------------------------------------

    def _own_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """This member's frozen entries in the group sketch: sorted ids, group hot rows
        (-1 = medium)."""
        assert self.group is not None
        keys, rows = self.group.sketch.snapshot()
        mine = key_members(keys) == self.member
        ids = key_ids(keys[mine])
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[mine][order]

    def training_bytes(self) -> int:
        if not self.joined:
            return super().training_bytes()
        assert self.group is not None
        # Its share of the group: the hot rows and sketch it brought.
        share = self.hot_rows / max(1, self.group.hot_rows)
        hot = self.hot_rows * self.tables[0].shape[1] * self.tables[0].element_size()
        projection = tensor_bytes([self.projection]) if self.projection is not None else 0
        return (tensor_bytes(self.tables[1:]) + hot + projection
                + round(share * self.group.sketch.nbytes()))

    def serving_bytes(self, fmt: str = "fp32") -> int:
        if not self.joined:
            return super().serving_bytes(fmt)
        from embeddings.budget import table_bytes

        ids, rows = self._own_entries()
        width = self.serving_widths()[0]
        hot = max(1, int(np.unique(rows[rows >= 0]).size))
        # An id int64 and a row int32 per frozen id, its compact hot table, its hash tables.
        return ids.size * (8 + 4) + table_bytes(hot, width, fmt) + sum(
            table_bytes(t.shape[0], width, fmt) for t in self.tables[1:])

    def packed_initial(self) -> list[torch.Tensor]:
        if not self.joined:
            return super().packed_initial()
        return [torch.cat([t.detach() for t in self.tables[1:]])]

    def frozen_mapper(self) -> Mapper:
        if not self.joined:
            return super().frozen_mapper()
        ids, rows = self._own_entries()
        hot = np.unique(rows[rows >= 0])
        compact = np.where(rows >= 0, np.searchsorted(hot, rows), -1).astype(rows.dtype)
        geometry = self.mapper.geometry()
        geometry["hot_rows"] = max(1, int(hot.size))
        return Mapper.build("cafe", geometry, {"ids": torch.from_numpy(ids.copy()),
                                               "rows": torch.from_numpy(compact)})

    @torch.no_grad()
    def serving_tables(self) -> list[torch.Tensor]:
        """A compact hot table of the rows this feature's hot ids hold (in the order of
        `frozen_mapper`'s rows), then its hash tables."""
        if not self.joined:
            return super().serving_tables()
        _, rows = self._own_entries()
        hot_rows = torch.from_numpy(np.unique(rows[rows >= 0]).astype(np.int64))
        hot = self.tables[0].detach()
        # A feature without hot ids still needs a row for the (never read) hot table.
        hot = hot.index_select(0, hot_rows.to(hot.device)) if hot_rows.numel() else hot[:1]
        return [hot.clone(), self.tables[1].detach().clone(), self.tables[2].detach().clone()]

    @property
    def hot_rows(self) -> int:
        return self.mapper.hot_rows


class CafeGroup(nn.Module):
    """The hot table and sketch of a collection's shared CAFE features.

    Args:
        members: the features' methods, in the collection's order (all of one width).
        optimizer, backend, device: as the collection's store.
    """

    def __init__(
        self,
        members: list[SharedCafeEmbedding],
        optimizer: TableOptimizer | None,
        backend: Backend,
        device: torch.device,
    ) -> None:
        super().__init__()
        if any(m.joined for m in members):
            raise ValueError("a shared CAFE feature already belongs to a collection's group: "
                             "its hot rows and sketch live there, build the method anew")
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a shared CAFE hot table serves at most {MAX_MEMBERS} features")
        widths = {m.tables[1].shape[1] for m in members}
        if len(widths) != 1:
            raise ValueError(f"shared CAFE features must have one table width, got {widths}")
        first = max(members, key=lambda m: m.hot_rows)
        self.hot_rows = sum(m.hot_rows for m in members)
        sketch = first.sketch
        self.sketch = HotSketch(
            max(1, self.hot_rows), self.hot_rows, sketch.base_threshold,
            medium_fraction=sketch.medium_fraction, decay=sketch.decay,
            decay_period=sketch.decay_mass / (sketch.buckets * sketch.base_threshold),
            adaptive=sketch.adaptive, seed=_GROUP_SEED,
        )
        initial = torch.cat([m.tables[0].detach()[: m.hot_rows] for m in members]) \
            if self.hot_rows else members[0].tables[0].detach()[:1]
        self.store = build_store([TableSpec(max(1, self.hot_rows), widths.pop())], optimizer,
                                 backend, device)
        self.store.load_tables([initial.to(device)])
        # Members are the collection's modules: referenced, not registered twice.
        self._members = list(members)
        for i, m in enumerate(members):
            # Plain attributes: the group is the collection's module, not each member's.
            object.__setattr__(m, "group", self)
            m.member = i
            # The member's own sketch is no longer read: free its memory.
            m.mapper.sketch = HotSketch(1, 0, sketch.base_threshold, seed=m.mapper.seed)

    @property
    def members(self) -> list[str]:
        """The members' feature names (set by the collection), in group order."""
        return self._names

    def hot_table(self) -> torch.Tensor:
        return self.store.weights()[0]

    def forward(self, hot: torch.Tensor) -> torch.Tensor:
        """hot [n, members] group rows or -1 → [n, members, width] (zeros where -1)."""
        n, m = hot.shape
        flat = hot.t().reshape(-1)  # bags member-major, one per (member, sample)
        read = flat >= 0
        lengths = read.to(torch.int64)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        out = self.store(flat[read], offsets)
        return out.view(m, n, -1).transpose(0, 1)

    @torch.no_grad()
    def after_step(self) -> None:
        """One sketch update for every member's ids of the step, then the row moves in the
        order the sketch made them (a row one member gives back may go to another)."""
        keys, hashes, tags, values = [], [], [], []
        for m in self._members:
            for k, h, t, norms in m.take_pending():
                v = norms.to("cpu", torch.float32).numpy()
                mean = v.mean() if v.size else 0.0
                if not mean > 0:
                    continue
                # Importance relative within each feature's batch (mean 1), as per feature.
                keys.append(k)
                hashes.append(h)
                tags.append(t)
                values.append(v / mean)
        if not keys:
            return
        events = self.sketch.update_arrays(np.concatenate(keys), np.concatenate(hashes),
                                           np.concatenate(values).astype(np.float32),
                                           np.concatenate(tags))
        if not len(events):
            return
        owners = key_members(events.ids)
        bounds = [0, *(np.flatnonzero(np.diff(owners)) + 1).tolist(), len(events)]
        for a, b in itertools.pairwise(bounds):
            self._members[int(owners[a])].migrate(SketchEvents(events.log[a:b]), None)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v.copy()) for k, v in self.sketch.arrays().items()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.sketch.load_arrays({k: v.cpu().numpy() for k, v in state.items()})


def join_shared(methods: dict[str, nn.Module], optimizer: TableOptimizer | None,
                backend: Backend, device: torch.device) -> list[CafeGroup]:
    """Join a collection's shared CAFE features into groups: one, or in a sharded run one
    per planned worker (`hot_table_group`, set by the router)."""
    by_group: dict[int, list[str]] = {}
    for name, m in methods.items():
        if isinstance(m, SharedCafeEmbedding):
            by_group.setdefault(getattr(m, "hot_table_group", 0), []).append(name)
    groups = []
    for key in sorted(by_group):
        names = by_group[key]
        group = CafeGroup([methods[n] for n in names], optimizer, backend, device)
        group._names = names
        groups.append(group)
    return groups


@nb.njit(cache=True)
def _shared_rows_kernel(keys, scores, rows, ids, tag, group_offset, offset, second_offset,
                        medium_threshold, hash_rows, buckets):
    """A member's lookups against the group sketch: (keys, key hashes, group hot row or -1,
    [hash1, hash2] rows in its stacked table, which are read, hash2 row or -1, ids in range).
    Hash rows follow the member's own geometry (`FrozenCafeMapper`), so its serving form
    maps alike."""
    n = ids.shape[0]
    n_buckets = keys.shape[0]
    out_keys = np.empty(n, np.int64)
    key_hashes = np.empty(n, np.int64)
    hot = np.full(n, -1, np.int64)
    out = np.empty((n, 2), np.int64)
    read = np.zeros((n, 2), np.bool_)
    tags = np.full(n, -1, np.int64)
    ok = True
    low = np.int64(1) << np.int64(55)
    for i in range(n):
        x = ids[i]
        if x >= low or x < -low:
            ok = False
        key = (tag << np.int64(56)) | (x & ((np.int64(1) << np.int64(56)) - 1))
        out_keys[i] = key
        kh = hash64_scalar(key, group_offset)
        key_hashes[i] = kh
        b = kh % n_buckets
        h = hash64_scalar(x, offset)
        out[i, 0] = (h // buckets) % hash_rows
        out[i, 1] = hash_rows
        read[i, 0] = True
        for k in range(keys.shape[1]):
            sc = scores[b, k]
            if sc > 0 and keys[b, k] == key:
                if rows[b, k] > 0:
                    hot[i] = rows[b, k] - 1
                    read[i, 0] = False
                elif sc >= medium_threshold:
                    t2 = hash64_scalar(x, second_offset) % hash_rows
                    out[i, 1] = hash_rows + t2
                    read[i, 1] = True
                    tags[i] = t2
                break
    return out_keys, key_hashes, hot, out, read, tags, ok


__all__ = ["CafeGroup", "FrozenCafeMapper", "SharedCafeEmbedding", "join_shared"]
