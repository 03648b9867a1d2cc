"""The synthetic generator: format, determinism, skew, labels, teacher ceiling and drift."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_pipeline import synthetic
from data_pipeline.datasets import iter_local_batches
from data_pipeline.schema import (
    DENSE_COLUMNS,
    FEATURE_COLUMNS,
    LABEL,
    SPARSE_COLUMNS,
    TERABYTE_CARDINALITIES,
    arrow_schema,
)
from data_pipeline.shards import MANIFEST
from data_pipeline.synthetic import SynthConfig, generate, generate_rows


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _manifest(root: Path) -> dict:
    m = json.loads((root / MANIFEST).read_text())
    m["synthetic"].pop("seconds")
    return m


@pytest.fixture(scope="module")
def two_days(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(rows=120_000, days=2, seed=3), out, use_ray=False)
    return out


def test_scaled_cardinalities_keep_tiny_features():
    cards = synthetic.scaled_cardinalities(1e-3)
    assert len(cards) == 26
    for real, scaled in zip(TERABYTE_CARDINALITIES, cards, strict=True):
        assert scaled == (real if real <= 64 else max(64, -(-real // 1000)))
    assert max(cards) == 39_980
    assert synthetic.scaled_cardinalities(1.0) == TERABYTE_CARDINALITIES


def test_schema_is_the_shard_schema(two_days):
    files = sorted(two_days.rglob("part-*.parquet"))
    assert [f.parent.name for f in files] == ["day=0", "day=1"]
    table = pq.read_table(files[0])
    assert table.schema.equals(arrow_schema(), check_metadata=True)
    assert generate_rows(SynthConfig(rows=100), 0, 0, 100).schema.equals(arrow_schema())
    manifest = json.loads((two_days / MANIFEST).read_text())
    assert manifest["rows"] == 120_000 and manifest["rejects"] == 0
    assert manifest["days"]["1"]["files"][0]["path"] == "day=1/part-00000.parquet"
    assert set(manifest["synthetic"]["teacher_auc"]) == {"train", "validation", "test"}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    config = SynthConfig(rows=30_000, days=2, seed=11, drift=0.01)
    generate(config, tmp_path / "a", use_ray=False)
    generate(config, tmp_path / "b", use_ray=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _manifest(tmp_path / "a") == _manifest(tmp_path / "b")
    generate(SynthConfig(rows=30_000, days=2, seed=12, drift=0.01), tmp_path / "c",
             use_ray=False)
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_rows_do_not_depend_on_how_parts_are_cut():
    config = SynthConfig(rows=10_000, seed=5)
    whole = generate_rows(config, 0, 0, 10_000)
    pieces = pa.concat_tables([generate_rows(config, 0, a, b)
                               for a, b in ((0, 1234), (1234, 7000), (7000, 10_000))])
    assert whole.equals(pieces)


def test_value_ranges_and_missing_rates():
    t = generate_rows(SynthConfig(rows=50_000, seed=1), 0, 0, 50_000)
    for c in SPARSE_COLUMNS:
        v = t[c].drop_null().to_numpy()
        assert v.min() >= 0 and v.max() < 2**32
    missing = {c: t[c].null_count / t.num_rows for c in FEATURE_COLUMNS}
    assert missing["C1"] == 0 and abs(missing["C22"] - 0.79) < 0.02
    assert abs(missing["I1"] - 0.445) < 0.02 and abs(missing["I12"] - 0.771) < 0.02
    assert missing["I2"] == 0
    i2 = t["I2"].to_numpy()
    assert 0.08 < np.mean(i2 < 0) < 0.14 and i2.min() >= -2
    assert t["I5"].drop_null().to_numpy().max() > 100_000  # heavy tail
    assert set(np.unique(t[LABEL].to_numpy())) == {0, 1}


def test_scramble_is_a_bijection_and_cardinality_is_respected():
    t = generate_rows(SynthConfig(rows=200_000, seed=2), 0, 0, 200_000)
    cards = synthetic.scaled_cardinalities(synthetic.DEFAULT_SCALE)
    for c, n in zip(SPARSE_COLUMNS, cards, strict=True):
        distinct = len(np.unique(t[c].drop_null().to_numpy()))
        assert distinct <= n
        if n <= 64:
            assert distinct == n  # every value of a small feature shows up
    items = np.arange(30_000, dtype=np.uint64)
    key = synthetic.teacher.key(9, 1)
    values = np.array([synthetic.kernels.scramble32(int(i), key) for i in items])
    assert len(np.unique(values)) == len(items)


def test_zipf_skew():
    t = generate_rows(SynthConfig(rows=200_000, seed=4), 0, 0, 200_000)
    _, counts = np.unique(t["C1"].to_numpy(), return_counts=True)  # ~40k values
    counts = np.sort(counts)[::-1]
    top = counts[: len(counts) // 100].sum() / counts.sum()
    assert top > 0.35, f"top 1% of C1's ids hold only {top:.2f} of its occurrences"
    assert counts[0] / counts.sum() > 0.05
    assert (counts == 1).sum() > 1000  # and a long tail of rare ids


@pytest.mark.parametrize("rate", [0.25, 0.1])
def test_positive_rate_near_target(rate):
    t = generate_rows(SynthConfig(rows=100_000, seed=6, positive_rate=rate), 0, 0, 100_000)
    assert abs(t[LABEL].to_numpy().mean() - rate) < 0.01


def _hashed_features(batch: dict, buckets: int = 1 << 16):
    import scipy.sparse as sp

    n = len(batch["label"])
    cols = (batch["sparse"] * 0x9E3779B1 + np.arange(26)[None, :] * 0x85EBCA6B) % buckets
    one_hot = sp.csr_matrix((np.ones(n * 26, np.float32),
                             (np.repeat(np.arange(n), 26), cols.ravel())), shape=(n, buckets))
    return sp.hstack([one_hot, sp.csr_matrix(batch["dense"])]).tocsr()


def test_teacher_auc_is_criteo_like_and_beats_logistic_regression(two_days):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    manifest = json.loads((two_days / MANIFEST).read_text())
    teacher = manifest["synthetic"]["teacher_auc"]
    for split in ("train", "validation", "test"):
        assert 0.75 <= teacher[split] <= 0.85, teacher
    assert abs(manifest["synthetic"]["positive_rate"] - 0.25) < 0.01

    train = next(iter_local_batches(two_days, "train", 1 << 30, as_torch=False))
    val = next(iter_local_batches(two_days, "validation", 1 << 30, as_torch=False))
    model = LogisticRegression(C=0.1, solver="saga", tol=1e-3, max_iter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga stops at max_iter: close enough for a floor
        model.fit(_hashed_features(train), train["label"])
    auc = roc_auc_score(val["label"], model.predict_proba(_hashed_features(val))[:, 1])
    assert auc > 0.6, "the features must carry signal a linear model can find"
    assert auc < teacher["validation"] - 0.05, (auc, teacher["validation"])


def test_teacher_logits_score_the_rows_as_the_manifest_says(two_days):
    from sklearn.metrics import roc_auc_score

    config = SynthConfig(rows=120_000, days=2, seed=3)
    start, stop = synthetic.split_boundaries(config.day_rows(), 1)
    logits, table = synthetic.teacher_logits(config, 1, start, stop)
    assert logits.dtype == np.float64 and len(logits) == table.num_rows == stop - start
    assert table.equals(generate_rows(config, 1, start, stop))
    labels = table[LABEL].to_numpy()
    auc = roc_auc_score(labels, logits)
    # The manifest's AUC comes from 16k-bin histograms of the same logits.
    assert auc == pytest.approx(_manifest(two_days)["synthetic"]["teacher_auc"]["validation"],
                                abs=1e-4)
    # Labels are Bernoulli(sigmoid(logit)): the mean probability matches the positive rate.
    assert abs((1 / (1 + np.exp(-logits))).mean() - labels.mean()) < 0.01


def test_drift_moves_the_hot_set():
    def top_ids(drift: float, day: int) -> set[int]:
        config = SynthConfig(rows=300_000, days=3, seed=8, drift=drift)
        t = generate_rows(config, day, 0, 50_000)
        ids, counts = np.unique(t["C1"].to_numpy(), return_counts=True)
        return set(ids[np.argsort(-counts)[:20]].tolist())

    assert len(top_ids(0.0, 0) & top_ids(0.0, 2)) >= 15
    assert len(top_ids(0.01, 0) & top_ids(0.01, 2)) <= 2


def test_rare_items_are_weaker_but_not_silent():
    # The teacher's latents shrink with popularity rank (kernels.RARITY_*): squared norms,
    # in units of 1/LATENT_STEPS², of the 100 most popular items against ranks 10k-20k.
    latents = synthetic.teacher.base_model(SynthConfig(rows=1).teacher_fields()).latents
    c1 = latents.norm_w[: latents.rows[0]] & np.uint64(0xFFFFFFFF)
    head, rare = c1[:100].mean(), c1[10_000:20_000].mean()
    expected = synthetic.kernels.rarity_scale(15_000.0) ** 2  # ≈ 0.0066
    assert 0.5 * expected < rare / head < 2 * expected
    assert rare > 5  # still ~2.5 quantisation steps per value: some signal left


def test_drift_keeps_the_teacher_as_strong(tmp_path):
    # Strength follows the day's popularity rank, not the item: as the hot set moves, the new
    # hot items are as strong as the old ones, so the last day is as predictable as the first.
    m = generate(SynthConfig(rows=300_000, days=3, seed=8, drift=0.05), tmp_path, use_ray=False)
    auc = m["synthetic"]["teacher_auc"]
    assert abs(auc["train"] - auc["validation"]) < 0.015, auc


def test_tsv_is_criteo_text_with_the_same_rows(tmp_path):
    config = SynthConfig(rows=4_000, days=2, seed=7)
    manifest = generate(config, tmp_path, "tsv", use_ray=False)
    assert (tmp_path / synthetic.SYNTHETIC_JSON).is_file()
    assert [f["path"] for d in manifest["days"].values() for f in d["files"]] == [
        "day_0", "day_1"]
    lines = (tmp_path / "day_1").read_text().splitlines()
    assert len(lines) == 2_000
    fields = lines[0].split("\t")
    assert len(fields) == 40
    for v in fields[14:]:
        assert v == "" or (len(v) == 8 and v == v.lower() and int(v, 16) >= 0)
    names = [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS]
    parsed = pacsv.read_csv(
        tmp_path / "day_1",
        read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in SPARSE_COLUMNS}, strings_can_be_null=True),
    )
    expected = generate_rows(config, 1, 0, 2_000)
    for c in [LABEL, *DENSE_COLUMNS]:
        np.testing.assert_array_equal(parsed[c].to_numpy(zero_copy_only=False).astype(float),
                                      expected[c].to_numpy(zero_copy_only=False).astype(float))
    for c in SPARSE_COLUMNS:
        got = [None if v is None else int(v, 16) for v in parsed[c].to_pylist()]
        assert got == expected[c].to_pylist()


def test_generation_with_ray_tasks_gives_the_same_bytes(ray_cluster, tmp_path):
    config = SynthConfig(rows=30_000, days=2, seed=21, part_rows=10_000)
    generate(config, tmp_path / "ray", use_ray=True)
    generate(config, tmp_path / "local", use_ray=False)
    assert len(_files(tmp_path / "ray")) == 4
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="positive_rate"):
        SynthConfig(rows=10, positive_rate=1.5)
    with pytest.raises(ValueError, match="rows"):
        SynthConfig(rows=2, days=3)
    with pytest.raises(ValueError, match="format"):
        generate(SynthConfig(rows=10), "/tmp/never", "csv")
