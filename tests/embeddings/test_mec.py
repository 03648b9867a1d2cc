"""MEC (arXiv 2502.15355): popularity-weighted product-quantisation codes of a trained table,
balanced by a perplexity term, frozen behind the trained mapper; small code tables fine-tune.

The contract (collapse exactness, exact bytes) runs over MEC in test_methods.py; these check
the paper's mechanism and MEC's own bytes and serving form."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from embeddings import budget
from embeddings.mapping import CodeMapper, pack_codes, unpack_codes
from embeddings.methods.base import FeatureStats, TrainedFeature
from embeddings.methods.full import FullConfig
from embeddings.methods.hashing_trick import HashConfig
from embeddings.methods.mec import (
    MECConfig,
    code_perplexity,
    fit_mec_codes,
    popularity_repeats,
)
from embeddings.methods.qr import QRConfig
from embeddings.optim import RowWiseAdagrad
from embeddings.serving_io import embedding_from_state, embedding_state

DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(n_values: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, a Zipf(1.1) stream of them): odd 32-bit values, as in test_methods."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.arange(n_values) * 2654435761 + 12345) % 2**31 * 2 + 1
    probs = torch.arange(1, n_values + 1, dtype=torch.float64).pow(-1.1)
    return values, values[torch.multinomial(probs, size, replacement=True, generator=g)]


def _trained(config, n_values: int, stats: FeatureStats, dim: int = DIM) -> TrainedFeature:
    """A trained feature whose rows are clustered (so codes can say something about them)."""
    torch.manual_seed(0)
    emb = config.build(n_values, dim, stats)
    with torch.no_grad():
        rows = emb.tables[0].shape[0]
        centres = torch.randn(32, dim) * 0.3
        emb.tables[0].copy_(centres[torch.randint(32, (rows,))] + 0.03 * torch.randn(rows, dim))
    return TrainedFeature(emb.collapse(), stats)


def test_codes_pack_into_twelve_bits_each_and_unpack_exactly() -> None:
    codes = torch.randint(0, 4096, (1000, 4))
    packed = pack_codes(codes, 12)
    assert packed.dtype == torch.uint8 and packed.shape == (1000, 6)  # 4 × 12 bits = 6 bytes
    assert torch.equal(unpack_codes(packed, 4, 12), codes)
    odd = torch.randint(0, 128, (50, 3))
    assert torch.equal(unpack_codes(pack_codes(odd, 7), 3, 7), odd)


def test_popular_rows_repeat_log2_count_times_and_every_row_at_least_once() -> None:
    reps = popularity_repeats(torch.tensor([0, 1, 2, 3, 1024, 1025]), 6)
    assert reps.tolist() == [1, 1, 1, 1, 10, 10]


def test_code_usage_perplexity_rises_with_the_balancing_term() -> None:
    # Rows in a few tight clusters of very different popularity: without the term the
    # codebooks, seeded at popular rows, leave most entries to the big clusters.
    g = torch.Generator().manual_seed(1)
    rows = 4000
    centres = torch.randn(20, DIM, generator=g)
    which = torch.multinomial(torch.arange(1, 21.0).pow(-2), rows, True, generator=g)
    vectors = centres[which] + 0.05 * torch.randn(rows, DIM, generator=g)
    counts = (1e5 / torch.arange(1, rows + 1.0).pow(1.2)).long()
    kwargs = {"codebooks": 4, "codebook_size": 64, "steps": 150, "seed": 3}
    off = fit_mec_codes(vectors, counts, perplexity_weight=0.0, **kwargs)
    on = fit_mec_codes(vectors, counts, perplexity_weight=1.0, **kwargs)
    assert on.perplexity > off.perplexity * 1.05, (off.perplexity, on.perplexity)
    assert off.perplexity == pytest.approx(code_perplexity(off.codes, 64))


def test_mec_starts_at_the_vqvae_reconstruction_and_collapses_exactly_through_safetensors(
    tmp_path,
) -> None:
    values, stream = _stream(5000, 40_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(FullConfig(), 5000, stats)
    config = MECConfig(codebook_size=4096, rows_per_code=1, min_values=1000, steps=10)
    emb = config.from_trained(5000, DIM, trained)
    assert isinstance(emb.mapper, CodeMapper)
    assert [tuple(t.shape) for t in emb.tables] == [(4096, DIM // 4)] * 4
    with torch.no_grad():
        start = emb(stats.values)
        target = trained.serving(stats.values)
    # The codes carry the trained rows: far closer than the rows' own spread.
    assert (start - target).pow(2).mean() < 0.25 * target.var(0).sum() / DIM
    opt = RowWiseAdagrad(emb.parameters(), lr=0.05)
    for batch in stream.view(-1, 1000)[:20]:
        loss = (emb(batch) - trained.serving(batch) * 2).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    serving = emb.collapse()
    config_json, tensors = embedding_state(serving, "f.")
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = embedding_from_state(config_json, load_file(tmp_path / "w.safetensors"), "f.")
    ids = torch.cat([values, torch.tensor([0, 2, 2**40, -1])])
    with torch.no_grad():
        assert (loaded(ids) - emb(ids)).abs().max() <= 1e-5
    # Exact bytes: 6 bytes of codes a trained row, the code tables, the trained vocabulary.
    rows = trained.serving.tables[0].rows
    vocab = trained.serving.mapper.serving_bytes()
    assert vocab > 0
    expected = 6 * rows + 4 * 4096 * (DIM // 4) * 4 + vocab
    assert emb.serving_bytes() == serving.serving_bytes() == loaded.serving_bytes() == expected
    assert emb.serving_bytes() == budget.mec_bytes(rows, 4, 4096, DIM) + vocab


def test_a_ratio_sizes_the_codebooks_and_an_unreachable_one_is_refused_with_the_largest() -> None:
    _, stream = _stream(4000, 20_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(HashConfig(ratio=1), 4000, stats)
    emb = MECConfig(ratio=8, steps=5).from_trained(4000, DIM, trained)
    served = emb.serving_bytes() - emb.mapper.inner.serving_bytes()
    assert served <= budget.table_bytes(trained.serving.tables[0].rows, DIM) / 8
    with pytest.raises(ValueError, match="largest ratio is"):
        MECConfig(ratio=100, steps=5).from_trained(4000, DIM, trained)


def test_small_fields_keep_their_trained_table_and_build_alone_is_refused() -> None:
    _, stream = _stream(3000, 10_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(HashConfig(ratio=1), 3000, stats)
    kept = MECConfig().from_trained(3000, DIM, trained)  # 3,000 rows < 100,000: kept
    assert torch.equal(kept.tables[0].detach(), trained.serving.tables[0].dequantize())
    with pytest.raises(ValueError, match="from_model"):
        MECConfig().build(3000, DIM, stats)
    two_tables = TrainedFeature(QRConfig(ratio=4).build(3000, DIM).collapse(), stats)
    with pytest.raises(ValueError, match="one 8-wide table"):
        MECConfig(ratio=4).from_trained(3000, DIM, two_tables)


def test_mec_under_mlet_starts_at_the_same_vectors() -> None:
    _, stream = _stream(4000, 20_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(HashConfig(ratio=1), 4000, stats)
    plain = MECConfig(ratio=4, steps=20).from_trained(4000, DIM, trained)
    wide = MECConfig(ratio=4, steps=20, mlet_dim=4 * DIM).from_trained(4000, DIM, trained)
    assert wide.tables[0].shape[1] == DIM
    with torch.no_grad():
        ids = stats.values[:500]
        assert (wide.collapse()(ids) - wide(ids)).abs().max() <= 1e-5
        # Same codes and tables when the codebook size agrees; else both approximate the rows.
        if plain.tables[0].shape[0] == wide.tables[0].shape[0]:
            assert (wide(ids) - plain(ids)).abs().max() <= 1e-5


def test_the_search_space_takes_mec_and_its_fields() -> None:
    from training.search.space import SearchSpace

    space = SearchSpace(
        methods={"mec": {"codebook_size": [256, 4096], "perplexity_weight": [0.0, 1.0]}},
        mlet=[0, 2],
    )
    assert set(space.methods) == {"mec"}
    # Three codebooks over d = 16 (+1 first-order column) are sub-vectors of 6, 6, 5 / 6, 5, 5.
    assert SearchSpace(methods={"mec": {"codebooks": [3]}}, embedding_dim=16).methods
    with pytest.raises(ValueError, match="codebooks each need a column"):
        SearchSpace(methods={"mec": {"codebooks": [8]}}, embedding_dim=4)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_served_model_with_mec_features_loads_and_scores_like_training(
    tmp_path, first_order: bool
) -> None:
    from embeddings.collection import EmbeddingCollection
    from embeddings.models import model_preset
    from embeddings.serving import ServingModel, export_model, load_model

    # With the first-order column every table is d + 1 = 17 wide: uneven code tables.
    spec = model_preset("dlrm-small").model_copy(update={"first_order": first_order})
    dim = spec.table_dim
    cards = [3000, 3000, 5]
    methods = {}
    for j, n in enumerate(cards):
        _, stream = _stream(n, 20_000, seed=j)
        stats = FeatureStats.from_ids(stream)
        trained = TrainedFeature(FullConfig().build(n, dim, stats).collapse(), stats)
        mlet = {"mlet_dim": 2 * dim} if j == 1 else {}  # under MLET: summed d-wide tables
        config = MECConfig(ratio=4, steps=5, **mlet) if n > 100 else MECConfig()
        methods[f"C{j + 1}"] = config.from_trained(n, dim, trained)
    if first_order:
        assert [t.shape[1] for t in methods["C1"].tables] == [5, 4, 4, 4]
    collection = EmbeddingCollection.from_methods(methods, dim)
    torch.manual_seed(0)
    spec = spec.model_copy(update={"num_sparse": len(cards)})
    dense = spec.build()
    served = collection.collapse()
    model = ServingModel(spec, dense, served.names, list(served.embeddings.values()))
    export_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    sparse = torch.stack([_stream(n, 300, seed=9)[1] for n in cards], 1)
    x = torch.randn(300, 13)
    with torch.no_grad():
        assert (loaded(x, sparse) - model(x, sparse)).abs().max() <= 1e-5
        trained_vectors = collection(sparse)
        assert (served(sparse) - trained_vectors).abs().max() <= 1e-5


def test_under_a_ratio_tiny_tables_stay_as_under_every_method() -> None:
    _, stream = _stream(150, 5_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(HashConfig(ratio=1), 150, stats)
    kept = MECConfig(ratio=10).from_trained(150, DIM, trained)  # 150 ≤ 2000 / 10
    assert not isinstance(kept.mapper, CodeMapper)
    assert torch.equal(kept.tables[0].detach(), trained.serving.tables[0].dequantize())


@pytest.mark.parametrize("mlet_dim", [None, 4 * (DIM + 1)])
def test_a_width_the_codebooks_do_not_divide_is_coded_in_uneven_sub_vectors(mlet_dim) -> None:
    # d + 1 = 9 (a first-order column): 4 codebooks over sub-vectors of 3, 2, 2, 2 columns.
    width = DIM + 1
    _, stream = _stream(4000, 20_000)
    stats = FeatureStats.from_ids(stream)
    trained = _trained(HashConfig(ratio=1), 4000, stats, dim=width)
    emb = MECConfig(ratio=4, steps=60, mlet_dim=mlet_dim).from_trained(4000, width, trained)
    assert isinstance(emb.mapper, CodeMapper)
    expected = [3, 2, 2, 2] if mlet_dim is None else [9, 9, 9, 9]
    assert [t.shape[1] for t in emb.tables] == expected
    with torch.no_grad():
        ids = stats.values
        start, target = emb(ids), trained.serving(ids)
        assert start.shape == target.shape == (ids.numel(), width)
        # Every column, the last (short) sub-vector's too, follows the trained rows.
        per_column = (start - target).pow(2).mean(0)
        assert (per_column < 0.25 * target.var(0)).all(), per_column
        serving = emb.collapse()
        assert (serving(ids) - start).abs().max() <= 1e-5
    rows = trained.serving.tables[0].rows
    size = emb.tables[0].shape[0]
    served = width * (4 if mlet_dim else 1)
    assert serving.serving_bytes() == budget.mec_bytes(rows, 4, size, served) \
        + trained.serving.mapper.serving_bytes()
