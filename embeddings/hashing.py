"""The one id hash of embpress: SplitMix64's finaliser over int64 tensors.

Training, sharding and serving all map raw ids through this function, so it must give the
same answer in every process, on every machine and device (never Python's `hash()`).
"""

from __future__ import annotations

import numba as nb
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
    z = ids.to(torch.int64) + _signed(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return z & _MASK63


def seed_offset(seed: int) -> np.uint64:
    """The constant `hash64` adds to an id for `seed`, for `hash64_scalar`."""
    return np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))


@nb.njit(inline="always")
def hash64_scalar(value: np.int64, offset: np.uint64) -> np.int64:
    """`hash64` of one id inside a numba kernel (`offset` = `seed_offset(seed)`): the same
    function, bit for bit (tested), so kernels hash ids without a round trip through torch."""
    z = np.uint64(value) + offset
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z & np.uint64(_MASK63))


def hash_bucket(ids: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """Row index in [0, buckets) for each id."""
    return hash64(ids, seed) % buckets


def hash64_reference(value: int, seed: int = 0) -> int:
    """Pure-Python twin of `hash64` for one value: the test oracle for every platform."""
    m = (1 << 64) - 1
    z = (value + (seed + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z = z ^ (z >> 31)
    return z & _MASK63
