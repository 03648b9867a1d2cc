"""SplitMix64, the one id hash of embpress, in every form a room needs it.

Training, sharding, serving, the statistics and the synthetic generator all mix 64-bit values
through the finaliser below, so a hash gives the same answer in every process, on every
machine and device (never Python's `hash()`). The forms, bit for bit the same (tested):

* `mix64`: numpy uint64 arrays; compiled by numba as `mix64_scalar` for kernels;
* `mix64_int`: Python ints (host-side keys, and the tests' oracle);
* `mix64_torch`: int64 tensors (two's complement, so shifts are made logical).

Serving and data-only processes import this module too, so neither torch nor numba is
imported here: torch is imported where a tensor function runs (whoever passes tensors has it
loaded already), and numba where a kernel first asks for `mix64_scalar` or `hash64_scalar`
(see `__getattr__`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the stream increment and seed step
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1

# numpy forms: numba freezes module constants into kernels, and uint64 operands keep numpy
# (and numba) in wrapping unsigned arithmetic.
GOLDEN_U64 = np.uint64(GOLDEN)
M1_U64 = np.uint64(M1)
M2_U64 = np.uint64(M2)
_MASK63_U64 = np.uint64(MASK63)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# ---------------------------------------------------------------------------------------------
# The mixer.


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of uint64 values: a bijection of [0, 2^64) that spreads every
    input bit over the output. numpy arrays here; inside numba kernels as `mix64_scalar`."""
    z = (z ^ (z >> _S30)) * M1_U64
    z = (z ^ (z >> _S27)) * M2_U64
    return z ^ (z >> _S31)


def mix64_int(z: int) -> int:
    """`mix64` of one Python int in [0, 2^64)."""
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


_M1_I64, _M2_I64 = _signed(M1), _signed(M2)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # Logical shift on int64: torch's >> is arithmetic, so clear the sign-extended bits.
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64_torch(z: torch.Tensor) -> torch.Tensor:
    """`mix64` of int64 tensors, read as the two's complement of the uint64 values."""
    z = (z ^ _shr(z, 30)) * _M1_I64
    z = (z ^ _shr(z, 27)) * _M2_I64
    return z ^ _shr(z, 31)


# ---------------------------------------------------------------------------------------------
# The id hash: mix(id + (seed + 1) * GOLDEN), the sign bit cleared.


def seed_offset(seed: int) -> np.uint64:
    """The constant the hash adds to an id for `seed` (what `hash64_scalar` takes)."""
    return np.uint64(((seed + 1) * GOLDEN) & MASK64)


def hash64_bits(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """All 64 bits (uint64) of the seeded hash of an int64 array: what `hash64` returns with
    its sign bit cleared; sketches that slice the hash into fields take these."""
    return mix64(ids.astype(np.uint64) + seed_offset(seed))


def hash64(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Non-negative 63-bit hash of int64 ids; different seeds give independent hashes."""
    if _numba_path(ids):
        return _hash_on_cpu(ids, seed, 0)
    import torch

    return mix64_torch(ids.to(torch.int64) + _signed(int(seed_offset(seed)))) & MASK63


def hash_bucket(ids: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """Row index in [0, buckets) for each id."""
    if _numba_path(ids):
        return _hash_on_cpu(ids, seed, buckets)
    return hash64(ids, seed) % buckets


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
        import torch

        return torch.zeros_like(ids, dtype=torch.int64)
    return hash_bucket(ids, num_shards, SHARD_HASH_SEED)


# ---------------------------------------------------------------------------------------------
# numba: compiled on first use, so importing this module does not import numba.


def _numba_path(ids: torch.Tensor) -> bool:
    """On CPU, where numba is already loaded (training processes load it for CAFE's sketch),
    the mixer runs as one compiled pass over the ids: torch's int64 ops take ~10 passes over
    memory with a slow multiply, which made hashing most of a training step's mapping time.
    Serving never loads numba and keeps the torch form; both agree bit for bit (tested)."""
    import torch

    return ids.device.type == "cpu" and ids.dtype == torch.int64 and "numba" in sys.modules


def _hash_on_cpu(ids: torch.Tensor, seed: int, buckets: int) -> torch.Tensor:
    """`hash64` (buckets 0) or `hash_bucket` by the compiled array kernel."""
    import torch

    flat = ids.detach().contiguous().reshape(-1).numpy()
    out = np.empty(flat.shape[0], np.int64)
    _compiled("hash_array")(flat, seed_offset(seed), np.int64(buckets), out)
    return torch.from_numpy(out).view(ids.shape)


def _hash64_scalar_of(mix: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    def hash64_scalar(value: np.int64, offset: np.uint64) -> np.int64:
        # `hash64` of one id inside a kernel (`offset` = `seed_offset(seed)`).
        return np.int64(mix(np.uint64(value) + offset) & _MASK63_U64)

    return hash64_scalar


def _hash_array_of(scalar: Callable[[Any, Any], Any]) -> Callable[..., None]:
    def hash_array(ids: np.ndarray, offset: np.uint64, buckets: np.int64, out: np.ndarray):
        # The hash over an array (mod `buckets` when > 0), the scalar form inlined.
        for i in range(ids.shape[0]):
            h = scalar(ids[i], offset)
            out[i] = h % buckets if buckets > 0 else h

    return hash_array


_COMPILED: dict[str, Any] = {}


def _compiled(name: str) -> Any:
    """The numba form of `name`, compiled once: `mix64_scalar` and `hash64_scalar` (inlined
    into the kernels that call them) and `hash_array`."""
    if name not in _COMPILED:
        import numba as nb

        if name == "mix64_scalar":
            _COMPILED[name] = nb.njit(inline="always")(mix64)
        elif name == "hash64_scalar":
            _COMPILED[name] = nb.njit(inline="always")(
                _hash64_scalar_of(_compiled("mix64_scalar")))
        else:
            _COMPILED[name] = nb.njit(_hash_array_of(_compiled("hash64_scalar")))
    return _COMPILED[name]


_LAZY = ("mix64_scalar", "hash64_scalar")


def __getattr__(name: str) -> Any:
    """`mix64_scalar` (`mix64`) and `hash64_scalar` (`hash64` of one id and a `seed_offset`)
    compiled by numba on first access, for kernels to call."""
    if name in _LAZY:
        compiled = _compiled(name)
        globals()[name] = compiled
        return compiled
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
