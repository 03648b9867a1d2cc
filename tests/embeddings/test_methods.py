"""Every compression method, and every MLET composition DESIGN.md allows, trains on a skewed
stream and collapses to a serving form that returns the same vectors; byte counts are exact."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import embeddings.collection  # noqa: F401 - imports every method module: all register
from embeddings import budget
from embeddings.methods.base import (
    METHODS,
    Combiner,
    FeatureStats,
    MethodConfig,
    TrainedFeature,
    TwoStageConfig,
    tensor_bytes,
    with_mlet,
)
from embeddings.methods.full import FullConfig
from embeddings.methods.hashing_trick import HashConfig
from embeddings.methods.qr import QRConfig, QRMapper
from embeddings.optim import RowWiseAdagrad
from embeddings.serving_io import embedding_state
from idhash.splitmix import hash_bucket

N_VALUES = 4000  # the feature's cardinality
DIM = 8


def zipf_stream(steps: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, batches): N_VALUES raw 32-bit values and a Zipf(1.1) stream of them."""
    g = torch.Generator().manual_seed(seed)
    # Distinct odd values spread over 32 bits (an odd multiplier is a bijection mod 2^31).
    values = (torch.arange(N_VALUES) * 2654435761 + 12345) % 2**31 * 2 + 1
    ranks = torch.arange(1, N_VALUES + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    idx = torch.multinomial(probs / probs.sum(), steps * batch, replacement=True, generator=g)
    return values, values[idx].view(steps, batch)


def targets_for(ids: torch.Tensor) -> torch.Tensor:
    """A fixed random target vector per raw id (deterministic in the id)."""
    from idhash.splitmix import hash64

    cols = [hash64(ids, seed=100 + j).to(torch.float64) / 2**63 for j in range(DIM)]
    return (torch.stack(cols, 1) * 2 - 1).float()


# A config of every method, each QR combiner, and every MLET composition allowed.
METHOD_CONFIGS: dict[str, MethodConfig] = {
    "full": FullConfig(),
    "full_capped_stats": FullConfig(ratio=4),
    "hash": HashConfig(ratio=4),
    "qr_product": QRConfig(ratio=4),
    "qr_sum": QRConfig(ratio=4, operation="sum"),
    "qr_concat": QRConfig(ratio=4, operation="concat"),
    "mlet_full": FullConfig(mlet_dim=4 * DIM),
    "mlet_hash": HashConfig(ratio=4, mlet_dim=2 * DIM),
    "mlet_qr_sum": QRConfig(ratio=4, operation="sum", mlet_dim=4 * DIM),
    "mlet_qr_concat": QRConfig(ratio=4, operation="concat", mlet_dim=16 * DIM),
}


def _train(config: MethodConfig, stats: FeatureStats | None, steps: int = 200,
           trained: TrainedFeature | None = None):
    torch.manual_seed(0)
    values, stream = zipf_stream(steps, 128)
    if trained is not None:
        emb = config.from_trained(N_VALUES, DIM, trained)
    else:
        emb = config.build(N_VALUES, DIM, stats)
    opt = RowWiseAdagrad(emb.parameters(), lr=0.1)
    first = last = None
    for batch in stream:
        loss = (emb(batch) - targets_for(batch)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        emb.after_step(opt)
        first = first if first is not None else loss.item()
        last = loss.item()
    return emb, values, stream, first, last


def _unseen(count: int = 500) -> torch.Tensor:
    # Even values: the stream's values are all odd. Beyond 2^32 and negative ones too.
    return torch.cat([torch.arange(count) * 2, torch.tensor([2**40, -1, -(2**62), 2**62])])


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_trained_method_collapses_to_identical_serving_form(name: str) -> None:
    config = METHOD_CONFIGS[name]
    stats = None
    if name.endswith("_stats"):
        stats = FeatureStats.from_ids(zipf_stream(300, 128)[1].flatten())
    emb, values, stream, first, last = _train(config, stats)
    assert last < first, f"{name} did not learn: {first} -> {last}"
    serving = emb.collapse()
    with torch.no_grad():
        for ids in (values, stream[-1], _unseen()):
            trained = emb(ids)
            assert trained.shape == (len(ids), DIM)
            assert (serving(ids) - trained).abs().max().item() <= 1e-5
    if emb.mlet_dim is not None:
        assert emb.tables[0].shape[1] in (emb.mlet_dim, emb.mlet_dim // 2)
        assert all(t.width == DIM for t in serving.tables), "MLET must fold to d-wide tables"


def _row_bounds(serving, quantised, ids: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |quantised(ids) − serving(ids)| from each table's row bounds."""
    lookup = serving.mapper(ids)
    exact = [t.lookup(lookup.rows[:, i]) for i, t in enumerate(serving.tables)]
    bound = [
        t.error_bound()[lookup.rows[:, i]][:, None].expand_as(exact[i])
        for i, t in enumerate(quantised.tables)
    ]
    if serving.combiner is Combiner.CONCAT:
        return torch.cat(bound, dim=1)
    if serving.combiner is Combiner.SUM:
        return sum(bound)
    (a, b), (ea, eb) = exact, bound
    return a.abs() * eb + b.abs() * ea + ea * eb


@pytest.mark.parametrize("name", ["hash", "qr_product", "qr_concat", "mlet_qr_sum", "full"])
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_quantised_serving_form_stays_within_its_format_bound(name: str, fmt: str) -> None:
    emb, values, _, _, _ = _train(METHOD_CONFIGS[name], None, steps=60)
    serving = emb.collapse()
    quantised = serving.quantize(fmt)
    ids = torch.cat([values, _unseen()])
    err = (quantised(ids) - serving(ids)).abs()
    bound = _row_bounds(serving, quantised, ids)
    slack = 1e-6 * serving(ids).abs().max()
    assert bool((err <= bound * (1 + 1e-5) + slack).all())
    assert quantised.serving_bytes() < serving.serving_bytes()


def test_mlet_over_qr_by_product_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="linear combiner"):
        QRConfig(ratio=4, mlet_dim=32)
    with pytest.raises(ValidationError, match="product"):
        with_mlet(QRConfig(ratio=4), 32)


def test_mlet_width_must_be_2_to_16_times_d() -> None:
    for k in (DIM, DIM + 1, 17 * DIM):
        with pytest.raises(ValueError, match="k/d"):
            HashConfig(ratio=4, mlet_dim=k).build(N_VALUES, DIM)
    emb = with_mlet(HashConfig(ratio=4), 2 * DIM).build(N_VALUES, DIM)
    assert emb.projection is not None and emb.projection.shape == (2 * DIM, DIM)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_byte_counts_are_exact_sums_of_tensor_bytes(name: str) -> None:
    stats = FeatureStats.from_ids(zipf_stream(20, 128)[1].flatten())
    config = METHOD_CONFIGS[name]
    emb = config.build(N_VALUES, DIM, stats)
    state = emb.state_dict()
    assert emb.training_bytes() == sum(t.numel() * t.element_size() for t in state.values())
    assert config.planned_bytes(N_VALUES, DIM, stats) == (
        emb.training_bytes(),
        emb.serving_bytes(),
    )
    serving = emb.collapse()
    for fmt in budget.SERVING_FORMATS:
        quantised = serving.quantize(fmt)
        _, tensors = embedding_state(quantised)
        assert quantised.serving_bytes() == tensor_bytes(tensors.values())
        assert emb.serving_bytes(fmt) == quantised.serving_bytes()


def test_hash_and_full_sizes_follow_the_budget_functions() -> None:
    assert HashConfig(ratio=7).build(1000, DIM).tables[0].shape == (math.ceil(1000 / 7), DIM)
    assert FullConfig().build(1000, DIM).tables[0].shape[0] == 1000
    assert FullConfig(cap=300).build(1000, DIM).tables[0].shape[0] == 300


def test_full_gives_frequent_values_their_own_rows_and_folds_the_rest() -> None:
    _, stream = zipf_stream(50, 128)
    stats = FeatureStats.from_ids(stream.flatten())
    emb = FullConfig(cap=100).build(N_VALUES, DIM, stats)
    rows = emb.mapper(stats.values).rows[:, 0]
    assert rows[:100].tolist() == list(range(100))  # most frequent first, own rows
    assert bool((rows[100:] < 100).all())  # capped values fold into the table
    roomy = FullConfig().build(N_VALUES, DIM, stats)
    known = len(stats.values)
    unseen = roomy.mapper(_unseen()).rows[:, 0]
    assert bool((unseen >= known).all()), "unseen values use the spare rows when there are any"
    assert torch.unique(roomy.mapper(stats.values).rows).numel() == known


def test_qr_uses_integer_division_beyond_float_precision() -> None:
    # Far beyond 2^24, where float division loses digits; a table this size does not fit,
    # so the mapper is tested alone.
    n = 2**40 + 12345
    mapper = QRMapper(n, 1000)
    ids = torch.randint(0, 2**62, (10_000,))
    rows = mapper(ids).rows
    index = hash_bucket(ids, n)
    assert torch.equal(rows[:, 0] * 1000 + rows[:, 1], index)
    assert int(rows[:, 1].max()) < 1000


def test_qr_sizes_reach_the_ratio_with_fewest_collisions() -> None:
    emb = QRConfig(ratio=10).build(100_000, DIM)
    q, r = (t.shape[0] for t in emb.tables)
    assert q + r <= 10_000 and q * r >= 100_000
    concat = QRConfig(ratio=10, operation="concat").build(100_000, DIM)
    assert concat.serving_bytes() <= budget.uncompressed_bytes(100_000, DIM) / 10


@pytest.mark.parametrize("operation", ["product", "sum", "concat"])
def test_qr_init_has_an_ordinary_embedding_scale(operation: str) -> None:
    torch.manual_seed(0)
    emb = QRConfig(collisions=50, operation=operation).build(100_000, 64)
    with torch.no_grad():
        out = emb(torch.randint(0, 2**32, (20_000,)))
    ordinary_var = 1 / 64 / 3  # U(±1/sqrt(d))
    assert abs(out.mean().item()) < 0.01
    assert out.var().item() == pytest.approx(ordinary_var, rel=0.1)


def test_mlet_output_starts_at_an_ordinary_scale() -> None:
    torch.manual_seed(0)
    emb = HashConfig(rows=5000, mlet_dim=256).build(100_000, 32)
    with torch.no_grad():
        out = emb(torch.randint(0, 2**32, (20_000,)))
    assert out.var().item() == pytest.approx(1 / 32 / 3, rel=0.15)


def test_every_registered_method_honours_the_contract() -> None:
    """Methods registered by other modules (CAFE, learned hash, MPE) build at a ratio, train,
    collapse exactly and count bytes exactly, like the ones above, bare and under MLET
    when they accept it. Two-stage methods (low-rank, MEC) are built from a quickly trained
    uncompressed feature's serving form (`from_trained`) and hold their own projections, so
    they are not tried under MLET."""
    stats = FeatureStats.from_ids(zipf_stream(300, 128)[1].flatten())
    trained = None
    for name, cls in sorted(METHODS.items()):
        base = cls.model_validate({"method": name}).at_ratio(4)
        variants = [base]
        two_stage = isinstance(base, TwoStageConfig)
        if two_stage and trained is None:
            first, *_ = _train(FullConfig(), stats, steps=80)
            trained = TrainedFeature(first.collapse(), stats)
        if base.accepts_mlet() and not two_stage:
            variants.append(with_mlet(base, 2 * DIM))
        for config in variants:
            emb, values, _, _, _ = _train(config, stats, steps=80,
                                          trained=trained if two_stage else None)
            serving = emb.collapse()
            with torch.no_grad():
                for ids in (values, _unseen()):
                    assert (serving(ids) - emb(ids)).abs().max().item() <= 1e-5, config
            assert serving.serving_bytes() == emb.serving_bytes(), config
            held = tensor_bytes(emb.parameters()) + tensor_bytes(emb.buffers())
            assert emb.training_bytes() == held + emb.extra_state_bytes(), config
            # Checkpoint/resume: a method built afresh (a two-stage one from its trained
            # feature again) takes the trained state and scores as the trained one.
            torch.manual_seed(1)
            fresh = (config.from_trained(N_VALUES, DIM, trained) if two_stage
                     else config.build(N_VALUES, DIM, stats))
            fresh.load_state_dict(emb.state_dict())
            with torch.no_grad():
                assert torch.equal(fresh(values), emb(values)), config
