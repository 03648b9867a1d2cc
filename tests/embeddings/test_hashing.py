import numba
import numpy as np
import torch

from embeddings.hashing import (
    hash64,
    hash64_reference,
    hash64_scalar,
    hash_bucket,
    seed_offset,
)


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
