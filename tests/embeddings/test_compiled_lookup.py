"""The compiled lookup path (stateless mappers in one pass, masked bags compacted in one
pass, gradient norms in one pass) gives exactly what the feature-by-feature torch path
gives, for every method, and follows a vocabulary a loaded state dict replaces."""

from __future__ import annotations

import numba  # noqa: F401 - the compiled path runs where numba is loaded, as in training
import pytest
import torch

from embeddings.batched_lookup import column_norms
from embeddings.collection import CollectionConfig, EmbeddingCollection, every_method
from embeddings.methods.base import FeatureStats
from embeddings.tables import TableOptimizer, TableSpec, build_store, fbgemm_available

pytestmark = pytest.mark.usefixtures("one_thread")

CARDS = [3, 40, 700, 5_000, 20_000, 60_000]


def _batch(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Skewed ids (a small vocabulary covers most of them), plus ids no statistics saw.
    cols = [(torch.rand(n, generator=g) ** 3 * c).long() for c in CARDS]
    sparse = torch.stack(cols, 1)
    sparse[0, 0], sparse[1, 1], sparse[2, 2] = -5, 2**40, 10**9
    return sparse


def _collection(method: dict, ratio: float | None) -> EmbeddingCollection:
    train = _batch(4096, 0)
    stats = {f"C{j + 1}": FeatureStats.from_ids(train[:, j]) for j in range(len(CARDS))}
    config = CollectionConfig(dim=8, cardinalities=CARDS, ratio=ratio, method=method)
    return EmbeddingCollection(config, stats, TableOptimizer(lr=0.05), backend="torch")


# Full tables take no ratio; QR cannot reach 100x on these cardinalities.
CASES = [(name, ratio) for name in every_method(16)
         for ratio in ((None,) if "full" in name else (10.0,) if "qr" in name else (10.0, 100.0))]


@pytest.mark.parametrize(("name", "ratio"), CASES)
def test_compiled_and_torch_lookups_agree(name: str, ratio: float | None) -> None:
    collection = _collection(every_method(16)[name], ratio)
    sparse = _batch(512, 1)
    plain = collection._lookup.plain
    assert plain, "every method keeps some small feature whole: the compiled pass has work"
    for valid in (None, torch.rand(sparse.shape, generator=torch.Generator().manual_seed(2))
                  > 0.3):
        torch_indices, torch_offsets, torch_keys = collection.lookup_inputs(
            sparse, valid, compiled=False)
        indices, offsets, keys = collection.lookup_inputs(sparse, valid, compiled=True)
        assert torch.equal(indices, torch_indices) and torch.equal(offsets, torch_offsets)
        assert keys.keys() == torch_keys.keys()


def test_a_loaded_vocabulary_is_the_one_the_compiled_pass_reads() -> None:
    collection = _collection({"method": "hash"}, 10.0)
    sparse = _batch(256, 3)
    before = collection.lookup_inputs(sparse, compiled=True)
    # Another model's id → row assignment, loaded into this one's buffers in place (as
    # load_state_dict does): the same known values, their rows reversed.
    state = collection.state_dict()
    names = [k for k in state if k.endswith("mapper.value_rows")]
    assert names, "some feature keeps its values whole"
    for name in names:
        state[name] = state[name].flip(0)
    collection.load_state_dict(state)
    after = collection.lookup_inputs(sparse, compiled=True)
    expected = collection.lookup_inputs(sparse, compiled=False)
    assert torch.equal(after[0], expected[0])
    assert not torch.equal(after[0], before[0]), "the new rows map ids elsewhere"


def test_column_norms_are_torch_norms() -> None:
    grad = torch.randn(300, 40)
    columns = [(0, 8), (8, 8), (24, 8)]
    expected = torch.stack([grad[:, a : a + w].norm(dim=1) for a, w in columns], dim=1)
    assert torch.allclose(column_norms(grad, columns), expected, rtol=1e-5, atol=1e-6)
    # Mixed widths take torch's path, with the same answer.
    mixed = [(0, 8), (8, 16)]
    assert torch.allclose(column_norms(grad, mixed), torch.stack(
        [grad[:, a : a + w].norm(dim=1) for a, w in mixed], dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm is not installed")
def test_fbgemm_row_states_follow_a_loaded_state_dict() -> None:
    specs = [TableSpec(10, 4), TableSpec(6, 4)]
    store = build_store(specs, TableOptimizer(lr=0.05), "fbgemm", torch.device("cpu"))
    first = store.row_states(1)[0]
    assert first.shape == (6, 1)
    state = store.state_dict()
    momentum = next(k for k in state if k.endswith("momentum1_host"))
    state[momentum] = torch.arange(16, dtype=state[momentum].dtype)
    store.load_state_dict(state)
    assert store.row_states(1)[0].flatten().tolist() == list(range(10, 16))
    assert store.row_states(0)[0].flatten().tolist() == list(range(10))
