"""The one hash (SplitMix64): every form agrees bit for bit, and importing it stays light."""

import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import torch

from idhash.splitmix import (
    GOLDEN,
    M1,
    M2,
    MASK63,
    hash64,
    hash64_bits,
    hash64_scalar,
    hash_bucket,
    mix64,
    mix64_int,
    mix64_scalar,
    mix64_torch,
    seed_offset,
)

ROOT = Path(__file__).resolve().parents[2]


def hash64_reference(value: int, seed: int = 0) -> int:
    """Pure-Python twin of `hash64` for one value: the oracle every form is held to."""
    m = (1 << 64) - 1
    z = (value + (seed + 1) * GOLDEN) & m
    z = ((z ^ (z >> 30)) * M1) & m
    z = ((z ^ (z >> 27)) * M2) & m
    return (z ^ (z >> 31)) & MASK63


def test_hash_matches_pure_python_reference_for_edge_values():
    values = [0, 1, -1, 2**31, 2**32 - 1, 2**40 + 7, -(2**63), 2**63 - 1]
    for seed in (0, 1, 17):
        got = hash64(torch.tensor(values, dtype=torch.int64), seed).tolist()
        assert got == [hash64_reference(v, seed) for v in values]


def test_hash_is_nonnegative_and_spreads_buckets():
    ids = torch.arange(100_000, dtype=torch.int64)
    h = hash_bucket(ids, 100, seed=3)
    assert h.min() >= 0 and h.max() < 100
    counts = torch.bincount(h, minlength=100).float()
    assert counts.std() / counts.mean() < 0.1


def test_seeds_give_different_hashes():
    ids = torch.arange(1000, dtype=torch.int64)
    assert (hash_bucket(ids, 1000, 0) != hash_bucket(ids, 1000, 1)).float().mean() > 0.9


@numba.njit
def _hash_all(values: np.ndarray, offset: np.uint64) -> np.ndarray:
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[i] = hash64_scalar(values[i], offset)
    return out


def test_numba_twin_hashes_bit_for_bit_like_hash64():
    edges = [0, 1, -1, 2**31, 2**32 - 1, 2**40 + 7, -(2**63), 2**63 - 1]
    rng = np.random.default_rng(0)
    values = np.concatenate([np.array(edges, np.int64),
                             rng.integers(-(2**63), 2**63 - 1, 10_000, dtype=np.int64)])
    for seed in (0, 1, 17, 2**40):
        expected = hash64(torch.from_numpy(values), seed).numpy()
        np.testing.assert_array_equal(_hash_all(values, seed_offset(seed)), expected)
    assert [int(v) for v in _hash_all(np.array(edges, np.int64), seed_offset(3))] == [
        hash64_reference(v, 3) for v in edges
    ]


def test_mixer_forms_agree_bit_for_bit():
    """numpy, Python-int and torch forms of the mixer (numba's is checked above)."""
    rng = np.random.default_rng(1)
    values = np.concatenate([np.array([0, 1, 2**63, 2**64 - 1], np.uint64),
                             rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64)])
    expected = [mix64_int(int(v)) for v in values]
    assert [int(v) for v in mix64(values)] == expected
    as_int64 = torch.from_numpy(values.view(np.int64))
    assert [int(v) for v in mix64_torch(as_int64).numpy().view(np.uint64)] == expected
    assert [int(v) for v in mix64_scalar_all(values)] == expected


@numba.njit
def mix64_scalar_all(values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[i] = mix64_scalar(values[i])
    return out


def test_hash64_bits_is_hash64_before_the_sign_bit_is_cleared():
    ids = np.array([0, 1, -1, 2**40 + 7, -(2**63), 2**63 - 1], np.int64)
    for seed in (0, 5):
        bits = hash64_bits(ids, seed)
        assert [int(b) & MASK63 for b in bits] == [hash64_reference(int(v), seed) for v in ids]


def test_importing_the_hash_loads_neither_torch_nor_numba():
    code = (
        "import sys\n"
        "import idhash.splitmix\n"
        "assert 'torch' not in sys.modules and 'numba' not in sys.modules, 'heavy import'\n"
        "from idhash.splitmix import hash64_scalar, mix64_scalar\n"
        "import numba\n"
        "assert isinstance(mix64_scalar, numba.core.registry.CPUDispatcher)\n"
        "assert idhash.splitmix.hash64_scalar is hash64_scalar\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_torch_form_of_hash64_matches_the_reference():
    # int32 ids take the torch form even where numba is loaded (the compiled pass reads int64).
    values = [0, 1, -1, 2**31 - 1, -(2**31), 12345]
    for seed in (0, 17):
        got = hash64(torch.tensor(values, dtype=torch.int32), seed).tolist()
        assert got == [hash64_reference(v, seed) for v in values]
