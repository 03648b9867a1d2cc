import numpy as np
import torch

from embeddings.hotsketch import DEMOTE, PROMOTE, HotSketch


def zipf_stream(n: int, values: int, a: float, seed: int) -> np.ndarray:
    """n draws of Zipf(a) over `values` raw 64-bit ids (rank r has probability ∝ r^-a)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, values + 1, dtype=np.float64) ** -a)
    ranks = np.searchsorted(cdf / cdf[-1], rng.random(n))
    return rng.integers(-(2**62), 2**62, size=values)[ranks]


def test_hot_set_holds_the_true_top_ids_of_a_zipf_stream():
    ids = zipf_stream(1_000_000, 1_000_000, 1.1, seed=0)
    values, counts = np.unique(ids, return_counts=True)
    top = set(values[np.argsort(-counts, kind="stable")[:1000]].tolist())
    sketch = HotSketch(buckets=1000, hot_rows=1000, threshold=10)
    stream = torch.from_numpy(ids)
    for start in range(0, len(ids), 4096):
        batch = stream[start : start + 4096]
        sketch.update(batch, torch.ones(len(batch)))  # frequency as importance
    hot = set(sketch.hot_ids().tolist())
    assert len(hot) == 1000
    assert len(hot & top) / 1000 >= 0.9


def test_hits_add_and_slots_stay_sorted():
    sketch = HotSketch(buckets=1, hot_rows=0, threshold=100, adaptive=False)
    sketch.insert(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    assert sketch.keys[0, :3].tolist() == [3, 2, 1]
    sketch.insert(torch.tensor([1]), torch.tensor([5.0]))
    assert sketch.keys[0, :3].tolist() == [1, 3, 2]
    assert sketch.scores[0, :3].tolist() == [6.0, 3.0, 2.0]
    scores = sketch.scores[0]
    assert (scores[:-1] >= scores[1:]).all()


def test_miss_takes_an_empty_slot_then_the_lowest_non_hot_one_never_a_hot_one():
    sketch = HotSketch(buckets=1, hot_rows=2, threshold=10, adaptive=False, decay_period=1e9)
    events = sketch.insert(torch.tensor([1, 2, 3, 4]), torch.tensor([20.0, 15.0, 2.0, 1.0]))
    assert events.kind.tolist() == [PROMOTE, PROMOTE]
    assert sorted(sketch.keys[0].tolist()) == [1, 2, 3, 4]
    # A heavy newcomer is admitted (probability s / (s_min + s) ≈ 1) into the lowest slot,
    # inheriting its score (SpaceSaving): 1 + 1000.
    sketch.insert(torch.tensor([5]), torch.tensor([1000.0]))
    assert 4 not in sketch.keys[0].tolist()
    assert sketch.keys[0, 0] == 5 and sketch.scores[0, 0] == 1001.0
    # 5 is above threshold but both hot rows are taken: it waits without a row.
    assert sorted(sketch.hot_ids().tolist()) == [1, 2]
    # With every non-hot slot gone the bucket would still never evict a hot id.
    for new_id in range(6, 40):
        sketch.insert(torch.tensor([new_id]), torch.tensor([1e6]))
        assert {1, 2} <= set(sketch.keys[0].tolist())


def test_decay_happens_when_the_inserted_mass_reaches_buckets_times_threshold_times_ten():
    sketch = HotSketch(buckets=1, hot_rows=1, threshold=5, adaptive=False)
    assert sketch.decay_mass == 50
    sketch.insert(torch.tensor([7]), torch.tensor([5.0]))
    assert sketch.hot_ids().tolist() == [7]
    sketch.insert(torch.tensor([7]), torch.tensor([44.0]))  # mass 49: no decay yet
    assert sketch.scores[0, 0] == 49.0
    sketch.insert(torch.tensor([8]), torch.tensor([1.0]))  # mass 50: every score × 0.99
    assert sketch.scores[0, :2].tolist() == [np.float32(49 * 0.99), np.float32(0.99)]
    assert sketch.threshold == 5  # a fixed threshold does not decay


def test_hot_id_that_decays_below_threshold_gives_its_row_back():
    sketch = HotSketch(buckets=1, hot_rows=1, threshold=5, adaptive=False)
    first = sketch.insert(torch.tensor([7]), torch.tensor([5.0]))
    assert first.kind.tolist() == [PROMOTE] and first.rows.tolist() == [0]
    events = sketch.insert(torch.tensor([8]), torch.tensor([45.0]))
    # 8 reaches 45 ≥ 5 but the only row is 7's; the decay then drops 7 to 4.95 < 5.
    assert events.kind.tolist()[0] == DEMOTE and events.ids.tolist()[0] == 7
    assert 7 not in sketch.hot_ids().tolist()
    # The freed row goes to the next id that reaches the threshold (8, on its next hit).
    again = sketch.insert(torch.tensor([8]), torch.tensor([1.0]))
    assert again.kind.tolist() == [PROMOTE] and again.ids.tolist() == [8]
    assert again.rows.tolist() == [0]


def test_adaptive_threshold_reranks_and_hands_rows_to_the_top_scores():
    sketch = HotSketch(buckets=64, hot_rows=10, threshold=1)
    # First-come: ten light ids take every row.
    sketch.insert(torch.arange(10), torch.full((10,), 1.0))
    assert sorted(sketch.hot_ids().tolist()) == list(range(10))
    # Heavier ids arrive; each time more than 12 ids are above the threshold, the top 10 by
    # score take the rows and the threshold becomes the 10th score.
    heavy = torch.arange(100, 120)
    events = sketch.insert(heavy, 50.0 + torch.arange(20, dtype=torch.float32))
    hot = sketch.hot_ids()
    assert set(hot.tolist()) <= set(heavy.tolist()) and len(hot) == 10
    assert set(events.ids[events.kind == DEMOTE].tolist()) >= set(range(10))
    hot_scores = sketch.scores[sketch.rows > 0]
    assert sketch.threshold == hot_scores.min() > 50


def test_split_inserts_replay_exactly_like_one_insert():
    # Small calls make the kernel stop for room in its event buffer at every re-rank and
    # decay; resuming must give the very same sketch and event sequence.
    ids = torch.from_numpy(zipf_stream(20_000, 5_000, 1.1, seed=1))
    scores = torch.rand(len(ids), generator=torch.Generator().manual_seed(0)) * 2
    whole = HotSketch(buckets=50, hot_rows=200, threshold=2, decay_period=0.5)
    parts = HotSketch(buckets=50, hot_rows=200, threshold=2, decay_period=0.5)
    one = whole.insert(ids, scores)
    many = [parts.insert(ids[i : i + 7], scores[i : i + 7]) for i in range(0, len(ids), 7)]
    assert (one.kind == DEMOTE).any()
    for name in ("kind", "ids", "rows", "medium"):
        joined = np.concatenate([getattr(e, name) for e in many])
        np.testing.assert_array_equal(getattr(one, name), joined)
    for name, array in whole.arrays().items():
        np.testing.assert_array_equal(array, parts.arrays()[name], err_msg=name)


def test_update_sums_duplicates_before_inserting():
    a = HotSketch(buckets=8, hot_rows=4, threshold=3)
    b = HotSketch(buckets=8, hot_rows=4, threshold=3)
    a.update(torch.tensor([5, 6, 5, 5]), torch.tensor([1.0, 2.0, 1.0, 1.0]))
    b.insert(torch.tensor([5, 6]), torch.tensor([3.0, 2.0]))
    for name, array in a.arrays().items():
        np.testing.assert_array_equal(array, b.arrays()[name], err_msg=name)


def test_snapshot_classifies_like_the_live_sketch():
    sketch = HotSketch(buckets=100, hot_rows=50, threshold=5, decay_period=1.0)
    stream = torch.from_numpy(zipf_stream(50_000, 20_000, 1.1, seed=2))
    for start in range(0, len(stream), 1000):
        sketch.update(stream[start : start + 1000], torch.ones(1000))
    ids, rows = sketch.snapshot()
    assert (np.diff(ids) > 0).all()
    probe = torch.cat([torch.from_numpy(sketch.keys.ravel()), torch.arange(-500, 500)])
    hot, medium = sketch.classify(probe)
    pos = np.clip(np.searchsorted(ids, probe.numpy()), 0, len(ids) - 1)
    found = ids[pos] == probe.numpy()
    np.testing.assert_array_equal(hot.numpy(), np.where(found, rows[pos], -1))
    np.testing.assert_array_equal(medium.numpy(), found & (rows[pos] < 0))
    assert medium.any() and (hot >= 0).sum() == 50
    assert sketch.frozen_size() == len(ids)


def test_byte_count_is_every_array_and_state_round_trips():
    sketch = HotSketch(buckets=300, hot_rows=250, threshold=4)
    assert sketch.nbytes() == sum(a.nbytes for a in sketch.arrays().values())
    assert sketch.nbytes() == HotSketch.planned_nbytes(300, 250)
    stream = torch.from_numpy(zipf_stream(10_000, 3_000, 1.1, seed=3))
    sketch.update(stream, torch.ones(len(stream)))
    copy = HotSketch(buckets=300, hot_rows=250, threshold=4)
    copy.load_arrays({k: v.copy() for k, v in sketch.arrays().items()})
    more = torch.from_numpy(zipf_stream(2_000, 3_000, 1.1, seed=4))
    e1 = sketch.update(more, torch.ones(len(more)))
    e2 = copy.update(more, torch.ones(len(more)))
    np.testing.assert_array_equal(e1.ids, e2.ids)
    for name, array in sketch.arrays().items():
        np.testing.assert_array_equal(array, copy.arrays()[name], err_msg=name)
