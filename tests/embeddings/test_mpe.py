"""MPE (arXiv 2409.20305): the search prunes a group its penalty dominates to 0 bits, those
rows score as zero vectors in training and serving, the switch restarts the rows, and the
serving form (packed per-width codes) scores exactly like the fixed-width model."""

from __future__ import annotations

import torch

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.base import FeatureStats, tensor_bytes
from embeddings.methods.mpe import MpeConfig, MpeEmbedding
from embeddings.optim import RowWiseAdagrad
from embeddings.serving_io import embedding_from_state, embedding_state
from embeddings.serving_mpe import code_bytes, pack_codes, unpack_codes

N_VALUES = 4000
DIM = 8


def _stream(steps: int, batch: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = (torch.arange(N_VALUES) * 2654435761 + 12345) % 2**31 * 2 + 1
    probs = torch.arange(1, N_VALUES + 1, dtype=torch.float64).pow(-1.1)
    idx = torch.multinomial(probs / probs.sum(), steps * batch, replacement=True, generator=g)
    return values, values[idx].view(steps, batch)


def _targets(ids: torch.Tensor) -> torch.Tensor:
    from idhash.splitmix import hash64

    cols = [hash64(ids, seed=100 + j).to(torch.float64) / 2**63 for j in range(DIM)]
    return (torch.stack(cols, 1) * 2 - 1).float() * 0.1


def _train(emb: MpeEmbedding, stream: torch.Tensor) -> None:
    table_opt = RowWiseAdagrad([emb.tables[0]], lr=0.1)
    dense_opt = torch.optim.Adam([emb.gamma, emb.alpha, emb.beta], lr=1e-2)
    for batch in stream:
        loss = (emb(batch) - _targets(batch)).pow(2).mean()
        penalty = emb.regularization()
        if penalty is not None:
            loss = loss + penalty
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        table_opt.step()
        dense_opt.step()
        emb.after_step(table_opt)


def _pruned_group_model(pruned_group: int, steps: int = 30, tail_reward: bool = False):
    values, stream = _stream(steps)
    stats = FeatureStats.from_ids(stream.flatten())
    emb = MpeConfig(ratio=4, groups=8, reg=1.0, search_steps=steps).build(N_VALUES, DIM, stats)
    # Only the chosen group pays for its bits: its penalty dominates, the others' is zero
    # (a negative weight on the tail rewards its bits, so that it surely keeps some).
    emb.rarity.zero_()
    emb.rarity[pruned_group] = 1.0
    if tail_reward:
        emb.rarity[-1] = -1.0
    torch.manual_seed(0)
    _train(emb, stream)
    return emb, values


def test_a_group_whose_penalty_dominates_goes_to_zero_bits_and_scores_zero_vectors() -> None:
    emb, values = _pruned_group_model(pruned_group=1, tail_reward=True)
    assert not emb.searching
    bits = emb.bits.tolist()
    assert bits[1] == 0
    assert bits[0] > 0 and bits[-1] > 0, bits  # the hottest group and the tail keep bits
    rows = emb.mapper(values).rows[:, 0]
    in_group = emb.group_of(rows) == 1
    assert int(in_group.sum()) > 0
    serving = emb.collapse()
    with torch.no_grad():
        trained = emb(values)
        served = serving(values)
    assert bool((trained[in_group] == 0).all())
    assert bool((served[in_group] == 0).all())
    assert bool((trained[~in_group].abs().sum(1) > 0).any())
    assert (served - trained).abs().max().item() <= 1e-5
    # The tail keeps bits, so the pruned values keep their keys (and only theirs).
    assert serving.mapper.zero_keys == int(emb.group_rows()[emb.bits == 0].sum()) > 0
    assert serving.serving_bytes() == emb.serving_bytes()


def test_a_pruned_tail_takes_the_pruned_rows_keys_with_it() -> None:
    emb, values = _pruned_group_model(pruned_group=7)  # the tail group (groups=8)
    assert emb.bits.tolist()[-1] == 0
    serving = emb.collapse()
    assert serving.mapper.zero_keys == 0 and serving.mapper.tail_rows == 0
    unseen = torch.arange(500) * 2  # even: never in the stream
    with torch.no_grad():
        assert bool((serving(unseen) == 0).all()) and bool((emb(unseen) == 0).all())
        assert (serving(values) - emb(values)).abs().max().item() <= 1e-5
    assert serving.serving_bytes() == emb.serving_bytes()


def test_the_switch_restarts_rows_and_their_optimizer_state_at_fixed_widths() -> None:
    values, stream = _stream(30)
    stats = FeatureStats.from_ids(stream.flatten())
    emb = MpeConfig(ratio=4, search_steps=20).build(N_VALUES, DIM, stats)
    initial = emb.tables[0].detach().clone()
    assert torch.equal(initial, emb.initial_table())
    table_opt = RowWiseAdagrad([emb.tables[0]], lr=0.1)
    dense_opt = torch.optim.Adam([emb.gamma, emb.alpha, emb.beta], lr=1e-2)
    for i, batch in enumerate(stream):
        loss = (emb(batch) - _targets(batch)).pow(2).mean() + emb.regularization() \
            if emb.searching else (emb(batch) - _targets(batch)).pow(2).mean()
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        table_opt.step()
        dense_opt.step()
        if i == 19:
            assert not torch.equal(emb.tables[0].detach(), initial)
        emb.after_step(table_opt)
        if i == 19:
            assert not emb.searching
            assert torch.equal(emb.tables[0].detach(), initial)
            state = table_opt.state_for(emb.tables[0])
            assert all(float(v.abs().sum()) == 0 for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() >= 1)
            assert emb.regularization() is None
    bits = emb.bits.clone()
    with torch.no_grad():
        trained = emb(values)
    assert (emb.collapse()(values) - trained).abs().max().item() <= 1e-5
    # The quantised rows take only their width's levels: (x − β)/α is an integer in range.
    rows = emb.mapper(values).rows[:, 0]
    width = bits.long()[emb.group_of(rows)]
    steps = emb.step_sizes().detach()[(width - 1).clamp(min=0)][:, None]
    levels = (trained - emb.beta.detach()) / steps
    kept = width > 0
    assert torch.allclose(levels[kept], levels[kept].round(), atol=1e-3)
    assert bool((levels[kept].abs() <= 2.0 ** (width[kept, None] - 1) + 1e-3).all())


def test_in_a_collection_the_switch_collapse_and_a_resume_agree() -> None:
    values, stream = _stream(24, batch=128)
    stream2 = torch.stack([stream, stream.flip(-1)], dim=-1)  # [steps, batch, 2 features]
    stats = {name: FeatureStats.from_ids(stream.flatten()) for name in ("C1", "C2")}
    config = CollectionConfig(dim=DIM, cardinalities=[N_VALUES, N_VALUES],
                              method={"method": "mpe", "ratio": 4, "search_steps": 12})
    torch.manual_seed(0)
    collection = EmbeddingCollection(config, stats)
    head = torch.randn(2 * DIM)
    dense_opt = torch.optim.Adam(collection.dense_parameters(), lr=1e-2)
    assert {id(p) for p in dense_opt.param_groups[0]["params"]} >= {
        id(collection.method("C1").gamma), id(collection.method("C2").beta)}
    for batch in stream2:
        logits = collection(batch).flatten(1) @ head
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, (batch[:, 0] % 3 == 0).float())
        penalty = collection.regularization()
        if penalty is not None:
            loss = loss + penalty
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        collection.step()
    assert all(not collection.method(n).searching for n in ("C1", "C2"))
    batch = torch.stack([values, values.flip(0)], dim=1)
    collection.eval()
    with torch.no_grad():
        trained = collection(batch)
        served = collection.collapse()(batch)
    assert (served - trained).abs().max().item() <= 1e-5
    # A resumed collection (state dict into a fresh build) has the widths and scores alike.
    torch.manual_seed(1)
    resumed = EmbeddingCollection(config, stats)
    resumed.load_state_dict(collection.state_dict())
    resumed.eval()
    assert torch.equal(resumed.method("C1").bits, collection.method("C1").bits)
    with torch.no_grad():
        assert (resumed(batch) - trained).abs().max().item() <= 1e-6


def test_serving_form_saves_and_loads_and_counts_its_bytes() -> None:
    emb, values = _pruned_group_model(pruned_group=1, steps=20)
    serving = emb.collapse()
    config, tensors = embedding_state(serving, prefix="f.")
    assert serving.serving_bytes() == tensor_bytes(tensors.values()) == emb.serving_bytes()
    loaded = embedding_from_state(config, tensors, prefix="f.")
    with torch.no_grad():
        assert torch.equal(loaded(values), serving(values))


def test_codes_pack_to_ceil_d_b_over_8_bytes_and_unpack() -> None:
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (50, 13))
        packed = pack_codes(codes, bits)
        assert packed.shape == (50, code_bytes(13, bits)) and packed.dtype == torch.uint8
        assert torch.equal(unpack_codes(packed, bits, 13), codes)


def test_the_plan_is_the_largest_width_and_training_lowers_it() -> None:
    _, stream = _stream(40)
    stats = FeatureStats.from_ids(stream.flatten())
    config = MpeConfig(ratio=10)
    planned = config.planned_bytes(N_VALUES, DIM, stats)
    assert planned.serving <= N_VALUES * DIM * 4 / 10
    emb, _ = _pruned_group_model(pruned_group=1)
    assert emb.serving_bytes() < MpeConfig(ratio=4, groups=8).planned_bytes(
        N_VALUES, DIM, FeatureStats.from_ids(_stream(40)[1].flatten())).serving


def test_the_compiled_kernel_has_lsq_plus_gradients_and_passes_other_features() -> None:
    from embeddings.methods.mpe import _MixedLsq, _ScaleGrad

    torch.manual_seed(0)
    n, k, d, widths = 64, 3, 8, 6
    x = (torch.randn(n, k, d) * 0.05).requires_grad_()
    logits = torch.randn(n, k, widths + 1).requires_grad_()
    alpha = (torch.rand(k, widths) * 0.02 + 0.005).requires_grad_()
    beta = (torch.randn(k, d) * 0.01).requires_grad_()
    scale = torch.rand(k, widths)
    bits = torch.arange(1, widths + 1, dtype=torch.float32)
    lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    through = torch.tensor([False, True, False])
    slot = torch.tensor([0, -1, 1])
    grad = torch.randn(n, k, d)

    def reference() -> torch.Tensor:
        # LSQ+ as the paper's code: x passes where lo ≤ w ≤ hi, clamped values are constants.
        p = torch.softmax(logits, -1)
        a = _ScaleGrad.apply(alpha, scale)[None, :, :, None]
        b = _ScaleGrad.apply(beta[:, None, :].expand(k, widths, d), scale[..., None])[None]
        w = (x[:, :, None, :] - b) / a
        lo_, hi_ = lo[None, None, :, None], hi[None, None, :, None]
        inside = (w >= lo_) & (w <= hi_)
        q = torch.where(inside, w + (torch.round(w) - w).detach(),
                        torch.clamp(torch.round(w), lo_, hi_).detach())
        out = ((q * a + b) * p[..., 1:, None]).sum(2)
        return torch.where(through[None, :, None], x, out)

    def compiled() -> torch.Tensor:
        # Each id its own group: probs[s, i] is row i's probabilities in feature slot s.
        probs = torch.softmax(logits, -1)[:, [0, 2], 1:].transpose(0, 1)
        groups = torch.arange(n)[:, None].expand(n, 2)
        return _MixedLsq.apply(x, probs, groups, alpha, beta, scale, lo, hi, slot, True)

    results = []
    for fn in (reference, compiled):
        for t in (x, logits, alpha, beta):
            t.grad = None
        out = fn()
        (out * grad).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (x, logits, alpha, beta)])
    for want, got in zip(*results, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(results[1][0][:, 1], x.detach()[:, 1])


def test_the_search_takes_its_share_of_the_steps_the_run_announces() -> None:
    emb = MpeConfig(ratio=4).build(N_VALUES, DIM)
    emb.schedule(300)
    assert emb.search_steps == 150
    fixed = MpeConfig(ratio=4, search_steps=7).build(N_VALUES, DIM)
    fixed.schedule(300)
    assert fixed.search_steps == 7


def test_an_int8_export_keeps_the_packed_codes() -> None:
    emb, values = _pruned_group_model(pruned_group=1, steps=20)
    serving = emb.collapse()
    quantised = serving.quantize("int8")
    assert quantised.serving_bytes() == serving.serving_bytes()
    with torch.no_grad():
        assert torch.equal(quantised(values), serving(values))
