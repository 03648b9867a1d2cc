import torch

from embeddings.hashing import hash64, hash64_reference, hash_bucket


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
