"""The one id hash of embpress: SplitMix64's finaliser over int64 tensors.

Training, sharding and serving all map raw ids through this function, so it must give the
same answer in every process, on every machine and device (never Python's `hash()`).

Serving imports this module too, so numba stays out of it until a kernel asks for
`hash64_scalar` (compiled on first access, see `__getattr__`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # Logical shift on int64: torch's >> is arithmetic, so clear the sign-extended bits.
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash64(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Non-negative 63-bit hash of int64 ids; different seeds give independent hashes."""
    if _numba_path(ids):
        return _hash_on_cpu(ids, seed, 0)
    z = ids.to(torch.int64) + _signed(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return z & _MASK63


def seed_offset(seed: int) -> np.uint64:
    """The constant `hash64` adds to an id for `seed`, for `hash64_scalar`."""
    return np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))


def _hash64_scalar(value: np.int64, offset: np.uint64) -> np.int64:
    """`hash64` of one id inside a numba kernel (`offset` = `seed_offset(seed)`): the same
    function, bit for bit (tested), so kernels hash ids without a round trip through torch.

    Reached as `hash64_scalar`, its numba-compiled form (see `__getattr__`)."""
    z = np.uint64(value) + offset
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z & np.uint64(_MASK63))


def hash_bucket(ids: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """Row index in [0, buckets) for each id."""
    if _numba_path(ids):
        return _hash_on_cpu(ids, seed, buckets)
    return hash64(ids, seed) % buckets


_ARRAY_KERNEL: list[Any] = []


def _numba_path(ids: torch.Tensor) -> bool:
    """On CPU, where numba is already loaded (training processes load it for CAFE's sketch),
    the mixer runs as one compiled pass over the ids: torch's int64 ops take ~10 passes over
    memory with a slow multiply, which made hashing most of a training step's mapping time.
    Serving never loads numba and keeps the torch form; both agree bit for bit (tested)."""
    return ids.device.type == "cpu" and ids.dtype == torch.int64 and "numba" in sys.modules


def _hash_on_cpu(ids: torch.Tensor, seed: int, buckets: int) -> torch.Tensor:
    """`hash64` (buckets 0) or `hash_bucket` by the compiled array kernel."""
    if not _ARRAY_KERNEL:
        import numba as nb

        _ARRAY_KERNEL.append(nb.njit(_hash_array_kernel(__getattr__("hash64_scalar"))))
    flat = ids.detach().contiguous().reshape(-1).numpy()
    out = np.empty(flat.shape[0], np.int64)
    _ARRAY_KERNEL[0](flat, seed_offset(seed), np.int64(buckets), out)
    return torch.from_numpy(out).view(ids.shape)


def _hash_array_kernel(scalar: Any) -> Any:
    """The mixer over an array (mod `buckets` when > 0), the scalar form inlined."""

    def hash_array(ids: np.ndarray, offset: np.uint64, buckets: np.int64, out: np.ndarray):
        for i in range(ids.shape[0]):
            h = scalar(ids[i], offset)
            out[i] = h % buckets if buckets > 0 else h

    return hash_array


def __getattr__(name: str) -> Any:
    """`hash64_scalar`: `_hash64_scalar` compiled by numba (inlined into the kernels that call
    it) on first access, so importing this module (serving does) does not import numba."""
    if name == "hash64_scalar":
        import numba as nb

        compiled = nb.njit(inline="always")(_hash64_scalar)
        globals()["hash64_scalar"] = compiled
        return compiled
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "hash64_scalar"})


# Seed of the id → shard hash of a feature split over training workers. Fixed forever (a
# checkpoint's shards, and a split feature's serving parts, depend on it) and far from the
# small seeds methods use for their own row hashes, so the two hashes stay independent: the
# ids that land on one shard still spread over all of its rows.
SHARD_HASH_SEED = 0x5348415244  # "SHARD"


def shard_of(ids: torch.Tensor, num_shards: int) -> torch.Tensor:
    """Shard index in [0, num_shards) of each raw id of a split feature.

    Args:
        ids: int64 raw feature values, any shape, any device.
        num_shards: how many parts the feature's id space is split into.
    """
    if num_shards == 1:
        return torch.zeros_like(ids, dtype=torch.int64)
    return hash_bucket(ids, num_shards, SHARD_HASH_SEED)


def hash64_reference(value: int, seed: int = 0) -> int:
    """Pure-Python twin of `hash64` for one value: the test oracle for every platform."""
    m = (1 << 64) - 1
    z = (value + (seed + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z = z ^ (z >> 31)
    return z & _MASK63
