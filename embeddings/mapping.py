"""Mappers: raw 64-bit ids → (table, row) lookups, and the combiners of what they read.

The serving form of every method: a frozen mapper (a hash, QR's quotient and remainder, a
learned or frozen id → row array) and a combiner. Training builds the same mappers (or, for
CAFE, a live subclass holding the sketch in `embeddings.methods.cafe`), so the two map ids
alike by construction. Serving imports this module, so it imports no training code: only
torch, numpy and the one hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from idhash.splitmix import MASK63, hash64, hash_bucket, mix64_torch, seed_offset


class Combiner(str, Enum):
    """How the per-table vectors of one id become one vector."""

    SUM = "sum"  # weighted sum (hashing, multi-level hash, QR by sum)
    CONCAT = "concat"  # side by side; widths `concat_widths(width, T)` (QR by concat, MEC, SCMA)
    PRODUCT = "product"  # element-wise product (QR by product); not linear, so no MLET


@dataclass
class Lookup:
    """Where each id reads: one row per table, and a per-table weight (0 = does not read).

    rows: LongTensor [n, T]; weights: float Tensor [n, T] or None (all ones).
    """

    rows: torch.Tensor
    weights: torch.Tensor | None = None


def tensor_bytes(tensors: Any) -> int:
    """Exact bytes of an iterable of tensors (the one budget primitive every count uses)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def concat_widths(width: int, tables: int) -> list[int]:
    """Widths of `tables` tables whose concatenation is `width` wide: as even as they can be,
    the wider ones first (a width T does not divide, e.g. d + 1 with a first-order column,
    still concatenates)."""
    if not 1 <= tables <= width:
        raise ValueError(f"{tables} concatenated tables cannot share a width of {width}")
    return [width // tables + int(i < width % tables) for i in range(tables)]


def combine(vectors: list[torch.Tensor], combiner: Combiner) -> torch.Tensor:
    """One vector per id from the vectors read in each table."""
    if len(vectors) == 1:
        return vectors[0]
    if combiner is Combiner.CONCAT:
        return torch.cat(vectors, dim=1)
    out = vectors[0]
    for v in vectors[1:]:
        out = out * v if combiner is Combiner.PRODUCT else out + v
    return out


def hash_columns(ids: torch.Tensor, seeds: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """`hash_bucket(ids[:, j], buckets[j], seeds[j])` for every column j in one pass.

    Args:
        ids: int64 [n, k] raw values, one feature per column.
        seeds: int64 [k] the offsets `hash64` adds for each column's seed (`seed_offsets`).
        buckets: int64 [k] rows of each column's table.
    """
    return (mix64_torch(ids + seeds) & MASK63) % buckets


def seed_offsets(seeds: list[int]) -> torch.Tensor:
    """int64 [k]: what `hash64` adds to an id for each seed, as signed 64-bit values."""
    return torch.tensor([int(seed_offset(s).astype("int64")) for s in seeds], dtype=torch.int64)


class Mapper(nn.Module):
    """Raw 64-bit ids → Lookup. Subclasses register any state as buffers.

    `kind` names the mapper in model.json; `export`/`from_export` freeze it for serving
    (plain JSON config + tensors for safetensors, never pickle): the config's keys are the
    constructor's keyword arguments, and `tensor_args` names the argument each exported
    tensor goes to. A subclass that declares its own `kind` registers itself in
    `Mapper.registry`, which `Mapper.build` reads; a subclass that inherits its `kind` (a
    live training mapper over a frozen one) exports in its parent's form and is rebuilt as
    the parent.
    """

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Mapper]]] = {}
    tensor_args: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            Mapper.registry[cls.kind] = cls

    def forward(self, ids: torch.Tensor) -> Lookup:  # pragma: no cover - abstract
        raise NotImplementedError

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able config and the tensors that fully determine the (frozen) mapping."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Mapper:
        """The frozen mapper of an `export()` (a missing tensor is passed as None)."""
        frozen = Mapper.registry[cls.kind]
        arrays = {arg: tensors.get(name) for name, arg in frozen.tensor_args.items()}
        return frozen(**config, **arrays)

    def state_bytes(self) -> int:
        """Bytes of the mapper's own state (buffers) while training."""
        return tensor_bytes(self.buffers())

    def serving_bytes(self) -> int:
        """Bytes of the frozen mapper's tensors (what serving keeps of this mapper)."""
        return tensor_bytes(self.export()[1].values())

    @staticmethod
    def build(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Mapper:
        """The frozen mapper of `kind` from its `export()`."""
        if kind not in Mapper.registry:
            raise ValueError(f"unknown mapper kind {kind!r}; known: {sorted(Mapper.registry)}")
        return Mapper.registry[kind].from_export(config, tensors)


class HashMapper(Mapper):
    """id → hash(id) mod rows: stateless (the hashing trick)."""

    kind = "hash"

    def __init__(self, rows: int, seed: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.seed = seed

    def forward(self, ids: torch.Tensor) -> Lookup:
        return Lookup(hash_bucket(ids, self.rows, self.seed)[:, None])

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"rows": self.rows, "seed": self.seed}, {}


class FullMapper(Mapper):
    """Known values → their own row; other values → hashed into the spare rows (uncompressed).

    Args:
        rows: rows of the table.
        values: int64 [m] known values, sorted ascending (m ≤ rows), or None.
        value_rows: int32 [m] the row of each known value.
        seed: hash seed for the values that have no row of their own.
    """

    kind = "full"
    tensor_args: ClassVar[dict[str, str]] = {"values": "values", "value_rows": "value_rows"}

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


class QRMapper(Mapper):
    """id → (hash(id) mod n) // c in the quotient table, (hash(id) mod n) % c in the remainder."""

    kind = "qr"

    def __init__(self, num_embeddings: int, collisions: int, seed: int = 0) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.collisions = collisions
        self.seed = seed

    def forward(self, ids: torch.Tensor) -> Lookup:
        index = hash_bucket(ids, self.num_embeddings, self.seed)
        quotient = torch.div(index, self.collisions, rounding_mode="floor")
        return Lookup(torch.stack([quotient, index - quotient * self.collisions], dim=1))

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "num_embeddings": self.num_embeddings,
            "collisions": self.collisions,
            "seed": self.seed,
        }
        return config, {}


class LearnedHashMapper(Mapper):
    """Mapped ids → their learned row; other ids → hash into the cluster rows.

    The mapping is learned by `embeddings.methods.learned_hash.fit_learned_hash`; this is
    the two arrays it produced, read the same way in training and serving.

    Args:
        rows: rows of the table.
        own_rows: rows [0, own_rows) belong to one frequent id each; the rest are clusters.
        seed: hash seed for ids without a learned row.
        values: int64 [m] mapped ids, sorted ascending (None = none).
        value_rows: int32 [m] the row of each mapped id.
    """

    kind = "learned_hash"
    tensor_args: ClassVar[dict[str, str]] = {"values": "values", "value_rows": "value_rows"}

    def __init__(
        self,
        rows: int,
        own_rows: int,
        seed: int = 0,
        values: torch.Tensor | None = None,
        value_rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= own_rows <= rows:
            raise ValueError(f"own_rows must be in [0, rows={rows}], got {own_rows}")
        self.rows = rows
        self.own_rows = own_rows
        self.seed = seed
        if values is None:
            values = torch.zeros(0, dtype=torch.int64)
            value_rows = torch.zeros(0, dtype=torch.int32)
        self.register_buffer("values", values.to(torch.int64))
        self.register_buffer("value_rows", value_rows.to(torch.int32))

    def fallback(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of an id with no learned row: hashed into the cluster rows (all rows if none)."""
        spare = self.rows - self.own_rows
        if spare > 0:
            return self.own_rows + hash_bucket(ids, spare, self.seed)
        return hash_bucket(ids, self.rows, self.seed)

    def forward(self, ids: torch.Tensor) -> Lookup:
        rows = self.fallback(ids)
        m = self.values.shape[0]
        if m:
            pos = torch.searchsorted(self.values, ids).clamp_(max=m - 1)
            hit = self.values[pos] == ids
            rows = torch.where(hit, self.value_rows[pos].to(torch.int64), rows)
        return Lookup(rows[:, None])

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"rows": self.rows, "own_rows": self.own_rows, "seed": self.seed}
        return config, {"values": self.values, "value_rows": self.value_rows}


class FrozenCafeMapper(Mapper):
    """CAFE's mapping, frozen: raw ids → hot row, or one or two hash rows.

    Tables: [hot, hash1, hash2]. Lookup weights: hot [1, 0, 0], medium [0, 1, 1],
    cold [0, 1, 0]. One hash h = hash64(id, seed) places an id twice: its sketch bucket is
    h mod buckets and its hash1 row (h div buckets) mod hash_rows, the part of h the bucket
    did not use; hash2 rows use the hash with seed + 1. The hot and medium ids are a sorted
    array searched per lookup; the live form (`embeddings.methods.cafe.CafeMapper`) asks its
    HotSketch instead and exports this form.

    Args:
        hot_rows: rows of the hot table.
        hash_rows: rows of each hash table.
        buckets: the sketch's bucket count (also places hash1 rows, so frozen mappers keep it).
        seed: hash seed.
        frozen_ids: int64 [m] ids that are hot or medium, sorted.
        frozen_rows: int32 [m] hot row of each, -1 for medium. A subclass that classifies
            ids otherwise (the live mapper) passes neither.
    """

    kind = "cafe"
    tensor_args: ClassVar[dict[str, str]] = {"ids": "frozen_ids", "rows": "frozen_rows"}

    def __init__(
        self,
        hot_rows: int,
        hash_rows: int,
        buckets: int,
        seed: int = 0,
        frozen_ids: torch.Tensor | None = None,
        frozen_rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.hot_rows = hot_rows
        self.hash_rows = hash_rows
        self.buckets = buckets
        self.seed = seed
        if (frozen_ids is None) != (frozen_rows is None):
            raise ValueError("give frozen_ids and frozen_rows together")
        if frozen_ids is not None:
            if frozen_ids.shape != frozen_rows.shape:
                raise ValueError("frozen_ids and frozen_rows must have one entry per id")
            self.register_buffer("frozen_ids", frozen_ids.to(torch.int64))
            self.register_buffer("frozen_rows", frozen_rows.to(torch.int32))
        elif type(self) is FrozenCafeMapper:
            raise ValueError("a frozen CAFE mapper needs its sorted ids (frozen_ids, frozen_rows)")

    @property
    def frozen(self) -> bool:
        return True

    def hash(self, ids: torch.Tensor) -> torch.Tensor:
        return hash64(ids, self.seed)

    def hash1_rows(self, hashes: torch.Tensor) -> torch.Tensor:
        return torch.div(hashes, self.buckets, rounding_mode="floor") % self.hash_rows

    def hash2_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return hash_bucket(ids, self.hash_rows, self.seed + 1)

    def classify(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hot row or -1, medium flag) of each id."""
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

    def geometry(self) -> dict[str, Any]:
        """The JSON part of `export`: sizes and seed."""
        return {
            "hot_rows": self.hot_rows,
            "hash_rows": self.hash_rows,
            "buckets": self.buckets,
            "seed": self.seed,
        }

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.geometry(), {"ids": self.frozen_ids, "rows": self.frozen_rows}


# Seeds of SCMA's slot hashes: slot s of a signed value hashes its signature with seed
# base + s, of any other value its id with base + _ID_SEEDS + s, so the two never correlate.
_SLOT_SEEDS = 1 << 12
_ID_SEEDS = 1 << 11


class ScmaMapper(Mapper):
    """SCMA's addressing (`embeddings.methods.scma`): id → S slots of one shared array.

    Slot s (chunk s of the vector, `chunk` floats wide) of a value with stored minhash
    signatures reads row hash(signature[s mod K], s) mod rows of the shared array; a value
    without signatures reads row hash(id, s) mod rows (ROBE-style hashing). Values with equal
    signatures therefore read equal rows in every slot, and two values share slot s with
    the probability that their row sets' minhashes agree (their Jaccard similarity).

    Args:
        rows: rows of the shared array (M / chunk).
        slots: reads per id (the vector's width / chunk).
        seed: hash seed.
        values: int64 [m] values with signatures, sorted ascending (None = none).
        signatures: int32 [m, K] their 32-bit minhash signatures (bit patterns).
    """

    kind = "scma"
    tensor_args: ClassVar[dict[str, str]] = {"values": "values", "signatures": "signatures"}

    def __init__(
        self,
        rows: int,
        slots: int,
        seed: int = 0,
        values: torch.Tensor | None = None,
        signatures: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if rows < 1 or slots < 1:
            raise ValueError(f"need rows ≥ 1 and slots ≥ 1, got {rows}, {slots}")
        if (values is None) != (signatures is None):
            raise ValueError("give values and signatures together")
        self.rows = rows
        self.slots = slots
        self.seed = seed
        if values is None:
            values = torch.zeros(0, dtype=torch.int64)
            signatures = torch.zeros(0, 1, dtype=torch.int32)
        if signatures.dim() != 2 or signatures.shape[0] != values.shape[0]:
            raise ValueError("signatures must be [values, K]")
        self.register_buffer("values", values.to(torch.int64))
        self.register_buffer("signatures", signatures.to(torch.int32))
        base = seed * _SLOT_SEEDS
        # Constants, not buffers: they are no state (a buffer would count as stored bytes).
        self._offsets = {
            "sig": seed_offsets([base + s for s in range(slots)]),
            "id": seed_offsets([base + _ID_SEEDS + s for s in range(slots)]),
            "column": torch.arange(slots) % max(1, signatures.shape[1]),
        }

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        t = self._offsets[name]
        if t.device != device:
            t = self._offsets[name] = t.to(device)
        return t

    def forward(self, ids: torch.Tensor) -> Lookup:
        ids = ids.contiguous()
        n = ids.shape[0]
        keys = ids[:, None].expand(n, self.slots)
        offsets = self._constant("id", ids.device)[None].expand(n, self.slots)
        m = self.values.shape[0]
        if m:
            pos = torch.searchsorted(self.values, ids).clamp_(max=m - 1)
            hit = (self.values[pos] == ids)[:, None]
            column = self._constant("column", ids.device)
            # int32 bit patterns back to the unsigned 32-bit minhashes.
            sig = self.signatures[pos][:, column].to(torch.int64) & 0xFFFFFFFF
            keys = torch.where(hit, sig, keys)
            offsets = torch.where(hit, self._constant("sig", ids.device)[None], offsets)
        return Lookup((mix64_torch(keys + offsets) & MASK63) % self.rows)

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"rows": self.rows, "slots": self.slots, "seed": self.seed}
        return config, {"values": self.values, "signatures": self.signatures}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n, ceil(T·bits/8)]: T codes of `bits` bits each per row, little-endian, packed
    without padding between codes (MEC's 4 × 12-bit codes are 6 bytes a row)."""
    n, count = codes.shape
    if count * bits > 63:
        raise ValueError(f"{count} codes of {bits} bits do not fit one 63-bit word")
    word = torch.zeros(n, dtype=torch.int64, device=codes.device)
    for j in range(count):
        word |= codes[:, j].to(torch.int64) << (j * bits)
    nbytes = (count * bits + 7) // 8
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(nbytes)], 1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """int64 [n, count]: the inverse of `pack_codes`."""
    word = torch.zeros(packed.shape[0], dtype=torch.int64, device=packed.device)
    for b in range(packed.shape[1]):
        word |= packed[:, b].to(torch.int64) << (8 * b)
    shifts = torch.arange(count, device=packed.device, dtype=torch.int64) * bits
    return (word[:, None] >> shifts) & ((1 << bits) - 1)


class CodeMapper(Mapper):
    """A trained feature's frozen mapper (raw id → row of its table), then that row's frozen
    product-quantisation codes: one row in each of `count` code tables (MEC).

    Args:
        inner: the trained feature's mapper (exported and rebuilt with this one).
        codes: uint8 [rows, ceil(count·bits/8)], `pack_codes` of each trained row's codes.
        count: codes per row (codebooks).
        bits: bits of each code.
    """

    kind = "codes"

    def __init__(self, inner: Mapper, codes: torch.Tensor, count: int, bits: int) -> None:
        super().__init__()
        self.inner = inner
        self.count = count
        self.bits = bits
        self.register_buffer("codes", codes.to(torch.uint8))

    def forward(self, ids: torch.Tensor) -> Lookup:
        rows = self.inner(ids).rows[:, 0]
        return Lookup(unpack_codes(self.codes.index_select(0, rows), self.count, self.bits))

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        inner_config, inner_tensors = self.inner.export()
        config = {
            "count": self.count,
            "bits": self.bits,
            "inner": {"kind": self.inner.kind, "config": inner_config},
        }
        tensors = {"codes": self.codes, **{f"inner.{k}": v for k, v in inner_tensors.items()}}
        return config, tensors

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Mapper:
        inner = config["inner"]
        prefix = "inner."
        inner_tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        return cls(
            Mapper.build(inner["kind"], inner["config"], inner_tensors),
            tensors["codes"],
            config["count"],
            config["bits"],
        )
