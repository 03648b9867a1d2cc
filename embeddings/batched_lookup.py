"""The store call's inputs for a batch: every feature's rows in the store's bag order.

The store (one table-batched embedding) reads bags table by table, each table's bags sample
by sample. `LookupLayout` places each feature's rows there. Stateless mappers (the hashing
trick, an uncompressed feature's vocabulary with its hashed spare rows) map in one compiled
pass over all of their features on CPU, writing straight into that order: feature by
feature, torch's searchsorted, gathers, hash passes, the concatenation and the permutation
took a third of a hash-method training step (issue 14). The other mappers (CAFE, QR,
learned hashing) map feature by feature and are copied into place with one `index_copy_`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embeddings.mapping import FullMapper, HashMapper
from embeddings.methods.base import CompressedEmbedding
from idhash.splitmix import seed_offset


@dataclass
class _Placement:
    """Where one batch size's entries go: `dest` [n·S_rest] is the bag-order position of
    each entry of the other features' [n, S_rest] row matrix; `offsets` the bags' offsets
    when every slot is read; `plain_starts` each plain feature's first position."""

    dest: torch.Tensor
    offsets: torch.Tensor
    plain_starts: np.ndarray


class LookupLayout:
    """Bag-order indices and offsets of a collection's store call.

    Args:
        names: the features, in store order (grouped by MLET width).
        embeddings: their methods.
        columns: each one's column in the batch's [n, F] id matrix.
        slot_table: the store table each lookup slot reads; a feature's slots are adjacent,
            in store order, and a table's slots are adjacent.
        num_tables: tables in the store.
    """

    def __init__(self, names: list[str], embeddings: list[CompressedEmbedding],
                 columns: list[int], slot_table: list[int], num_tables: int) -> None:
        self.names = names
        self.embeddings = embeddings
        self.columns = columns
        self.slot_table = torch.tensor(slot_table, dtype=torch.int64)
        self.slots_per_table = torch.bincount(self.slot_table, minlength=num_tables)
        first = 0
        self.feature_slots: list[range] = []
        for emb in embeddings:
            count = emb.packed_slots()
            self.feature_slots.append(range(first, first + count))
            first += count
        if first != len(slot_table):
            raise ValueError(f"the features read {first} slots; the layout has {len(slot_table)}")
        self.plain = [q for q, emb in enumerate(embeddings) if _is_plain(emb)]
        self._kernel_args: tuple[Any, ...] | None = None
        self._kernel_key: tuple[int, ...] = ()
        self._cache: dict[tuple[int, str, bool], _Placement] = {}

    def lookup_inputs(self, sparse: torch.Tensor, valid: torch.Tensor | None = None,
                      compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(indices, offsets) of the store call, and each adaptive feature's lookup key (for
        its gradient-norm update). `valid` [n, F]: entries to read (the others get empty
        bags: zero vectors). `compiled`: map the plain features in one compiled pass
        (default: on CPU where numba is loaded, as in every training process)."""
        if compiled is None:
            compiled = compiled_path(sparse)
        plain = compiled and valid is None and bool(self.plain)
        n = sparse.shape[0]
        placement = self._placement(n, sparse.device, plain)
        ids = sparse.t().contiguous()
        total = n * self.slot_table.numel()
        indices = torch.empty(total, dtype=torch.int64, device=sparse.device)
        if plain:
            _map_plain(ids, self._plain_args(), placement.plain_starts, indices)
        rows, masks, keys = self._map_others(ids, valid, plain)
        if rows:
            matrix = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
            indices.index_copy_(0, placement.dest, matrix.reshape(-1))
        if all(m is None for m in masks):
            return indices, placement.offsets, keys
        read_rows = torch.cat([
            m if m is not None else torch.ones_like(r, dtype=torch.bool)
            for r, m in zip(rows, masks, strict=True)
        ], dim=1)
        read = torch.ones(total, dtype=torch.bool, device=sparse.device)
        read.index_copy_(0, placement.dest, read_rows.reshape(-1))
        if compiled:
            return (*_compact(indices, read, placement.offsets), keys)
        # A bag's length is what it reads: the offsets are the running count of reads at the
        # full layout's bag boundaries.
        counts = torch.cat([read.new_zeros(1, dtype=torch.int64), read.cumsum(0)])
        return indices[read], counts[placement.offsets], keys

    def _map_others(self, ids: torch.Tensor, valid: torch.Tensor | None, compiled: bool
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict]:
        """Row matrices and read masks of the features the compiled pass leaves, in store
        order, and the adaptive features' lookup keys."""
        plain = set(self.plain) if compiled else set()
        rows, masks, keys = [], [], {}
        for q, emb in enumerate(self.embeddings):
            if q in plain:
                continue
            j = self.columns[q]
            r, m = emb.packed_lookup(ids[j])
            if valid is not None:
                keep = valid[:, j : j + 1]
                m = keep.expand_as(r) if m is None else m & keep
            rows.append(r)
            masks.append(m)
            if emb.wants_gradient_norms:
                keys[self.names[q]] = getattr(emb, "last_key", None)
        return rows, masks, keys

    def _placement(self, n: int, device: torch.device, compiled: bool) -> _Placement:
        key = (n, str(device), compiled)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self._build_placement(n, device, compiled)
        return self._cache[key]

    def _build_placement(self, n: int, device: torch.device, compiled: bool) -> _Placement:
        slots = self.slot_table.numel()
        table_first = torch.cumsum(self.slots_per_table, 0) - self.slots_per_table
        # Bag-order position of (sample i, slot s) of table t holding k slots from slot f:
        # n·f (the tables before) + i·k (the samples before) + s − f.
        t = self.slot_table
        k, f = self.slots_per_table[t], table_first[t]
        s = torch.arange(slots)
        position = n * f[None, :] + torch.arange(n)[:, None] * k[None, :] + (s - f)[None, :]
        plain = set(self.plain) if compiled else set()
        kept = [s for q, r in enumerate(self.feature_slots) if q not in plain for s in r]
        dest = position[:, kept].reshape(-1)
        lengths = self.slots_per_table.repeat_interleave(n)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        starts = np.array([int(position[0, self.feature_slots[q][0]]) for q in self.plain]
                          if compiled else [], dtype=np.int64)
        return _Placement(dest.to(device), offsets.to(device), starts)

    def _plain_args(self) -> tuple[Any, ...]:
        """The compiled pass's per-feature arrays, rebuilt when a vocabulary changes (a
        loaded state dict writes the mapper's buffers in place)."""
        mappers = [self.embeddings[q].mapper for q in self.plain]
        key = tuple(
            x for m in mappers if isinstance(m, FullMapper) and m.known
            for v in (m.values, m.value_rows) for x in (v.data_ptr(), v._version)
        )
        if self._kernel_args is None or key != self._kernel_key:
            self._kernel_args = _plain_arrays([self.columns[q] for q in self.plain], mappers)
            self._kernel_key = key
        return self._kernel_args


def _is_plain(emb: CompressedEmbedding) -> bool:
    """A feature the compiled pass maps: one table read through a stateless mapper, by the
    base lookup (no mask, no lookup key)."""
    return (type(emb.mapper) in (HashMapper, FullMapper) and emb.packed_slots() == 1
            and type(emb).packed_lookup is CompressedEmbedding.packed_lookup
            and not emb.wants_gradient_norms)


def _plain_arrays(columns: list[int], mappers: list[Any]) -> tuple[np.ndarray, ...]:
    """(columns, seed offsets, hashed rows' first row, hashed rows, each vocabulary's slot
    start and slot mask in the concatenated open-addressing tables, their keys and rows)
    of the plain features. An open-addressing table (load ≤ 1/2) answers a known value in
    about one probe; a binary search of the sorted vocabulary took 4× the whole pass."""
    offsets, first, buckets, starts, masks, keys, rows = [], [], [], [], [], [], []
    start = 0
    for m in mappers:
        known = m.known if isinstance(m, FullMapper) else 0
        spare = m.rows - known
        # FullMapper: unknown values hash into the spare rows, or over all rows if none.
        first.append(known if spare > 0 else 0)
        buckets.append(spare if spare > 0 else m.rows)
        offsets.append(seed_offset(m.seed))
        size = 1 << max(1, (2 * known - 1).bit_length()) if known else 0
        starts.append(start)
        masks.append(size - 1)
        if known:
            table_keys = np.zeros(size, np.int64)
            table_rows = np.full(size, -1, np.int64)
            open_addressing_builder()(m.values.detach().cpu().numpy(),
                            m.value_rows.detach().cpu().numpy().astype(np.int64),
                            table_keys, table_rows)
            keys.append(table_keys)
            rows.append(table_rows)
        start += size
    return (
        np.asarray(columns, dtype=np.int64), np.asarray(offsets, dtype=np.uint64),
        np.asarray(first, dtype=np.int64), np.asarray(buckets, dtype=np.int64),
        np.asarray(starts, dtype=np.int64), np.asarray(masks, dtype=np.int64),
        np.concatenate(keys) if keys else np.zeros(1, np.int64),
        np.concatenate(rows) if rows else np.full(1, -1, np.int64),
    )


def _map_plain(ids: torch.Tensor, args: tuple[np.ndarray, ...], starts: np.ndarray,
               out: torch.Tensor) -> None:
    _kernel()(ids.numpy(), *args, starts, out.numpy())


def _compact(indices: torch.Tensor, read: torch.Tensor, offsets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The read entries and their bags' offsets, in one compiled pass (torch's boolean
    index, running count and gather took three)."""
    out = np.empty(indices.shape[0], np.int64)
    new_offsets = np.empty(offsets.shape[0], np.int64)
    kept = _compact_kernel()(indices.numpy(), read.numpy(), offsets.numpy(), out, new_offsets)
    return torch.from_numpy(out[:kept]), torch.from_numpy(new_offsets)


def compiled_path(t: torch.Tensor) -> bool:
    """Whether a batch takes the compiled kernels: on CPU, where numba is loaded (every
    training process loads it for CAFE's sketch; serving never does)."""
    return t.device.type == "cpu" and "numba" in sys.modules


def column_norms(grad: torch.Tensor, columns: list[tuple[int, int]]) -> torch.Tensor:
    """[n, len(columns)] L2 norms of each row's columns [start, start + width), on the CPU.

    One compiled pass where the widths agree: a torch norm per strided column slice cost
    ~150 µs each at batch 4096 on CPU, and a gather first about as much.
    """
    widths = {w for _, w in columns}
    if len(widths) != 1 or not compiled_path(grad):
        return torch.stack([grad[:, a : a + w].norm(dim=1) for a, w in columns], dim=1).cpu()
    starts = np.array([a for a, _ in columns], np.int64)
    g = grad.detach().contiguous().numpy()
    out = np.empty((g.shape[0], starts.shape[0]), np.float32)
    _norms_kernel()(g, starts, widths.pop(), out)
    return torch.from_numpy(out)


_KERNELS: dict[str, Any] = {}


def _norms_kernel() -> Any:
    if "norms" not in _KERNELS:
        import numba as nb

        @nb.njit(nogil=True)
        def norms(g, starts, width, out):  # pragma: no cover - compiled
            for i in range(g.shape[0]):
                for f in range(starts.shape[0]):
                    acc = np.float32(0.0)
                    for c in range(starts[f], starts[f] + width):
                        acc += g[i, c] * g[i, c]
                    out[i, f] = np.sqrt(acc)

        _KERNELS["norms"] = norms
    return _KERNELS["norms"]


def _compact_kernel() -> Any:
    if "compact" not in _KERNELS:
        import numba as nb

        @nb.njit(nogil=True)
        def compact(indices, read, offsets, out, new_offsets):  # pragma: no cover - compiled
            kept = 0
            new_offsets[0] = 0
            for b in range(offsets.shape[0] - 1):
                for e in range(offsets[b], offsets[b + 1]):
                    if read[e]:
                        out[kept] = indices[e]
                        kept += 1
                new_offsets[b + 1] = kept
            return kept

        _KERNELS["compact"] = compact
    return _KERNELS["compact"]


def open_addressing_builder() -> Any:
    """Fills one open-addressing table (compiled on first use)."""
    if "build" not in _KERNELS:
        import numba as nb

        from idhash.splitmix import hash64_scalar

        @nb.njit(nogil=True)
        def build(values, value_rows, keys, rows):  # pragma: no cover - compiled
            mask = keys.shape[0] - 1
            zero = np.uint64(0)
            for i in range(values.shape[0]):
                slot = hash64_scalar(values[i], zero) & mask
                while rows[slot] >= 0:
                    slot = (slot + 1) & mask
                keys[slot] = values[i]
                rows[slot] = value_rows[i]

        _KERNELS["build"] = build
    return _KERNELS["build"]


def _kernel() -> Any:
    """The compiled pass, compiled on first use (importing this module loads no numba)."""
    if "map" not in _KERNELS:
        import numba as nb

        from idhash.splitmix import hash64_scalar

        @nb.njit(nogil=True)
        def map_plain(ids, columns, offsets, first, buckets, table_starts, table_masks,
                      keys, rows, out_starts, out):  # pragma: no cover - compiled
            n = ids.shape[1]
            zero = np.uint64(0)
            for p in range(columns.shape[0]):
                col, base = columns[p], out_starts[p]
                start, mask = table_starts[p], table_masks[p]
                for i in range(n):
                    x = ids[col, i]
                    row = -1
                    if mask > 0:  # the vocabulary's table: probe until the value or a gap
                        slot = hash64_scalar(x, zero) & mask
                        while rows[start + slot] >= 0:
                            if keys[start + slot] == x:
                                row = rows[start + slot]
                                break
                            slot = (slot + 1) & mask
                    if row < 0:
                        row = first[p] + hash64_scalar(x, offsets[p]) % buckets[p]
                    out[base + i] = row

        _KERNELS["map"] = map_plain
    return _KERNELS["map"]
