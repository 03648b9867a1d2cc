"""The training job: single process, 1 vs 2 Ray Train workers, failure and resume, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.datasets import iter_local_batches, read_piece
from data_pipeline.partition import train_pieces
from data_pipeline.schema import MISSING_ID, SPARSE_COLUMNS
from data_pipeline.stats import load_feature_stats
from data_pipeline.transforms import transform_table
from embeddings.metrics import FrequencyBand, roc_auc, row_bands
from embeddings.serving import load_model
from training.audit import FINGERPRINT_MOD, row_fingerprint
from training.config import ConfigError, TrainConfig
from training.evaluation import frequency_bands
from training.plan import plan_run, realised_ratio
from training.run import run
from training.worker import train_loop_per_worker


def _config(root, tmp_path, name, **overrides) -> TrainConfig:
    raw = {
        "data": {"path": str(root), "batch_size": 1024, "eval_batch_size": 8192},
        "embeddings": {"ratio": 10, "method": {"method": "hash"}},
        "schedule": {"max_steps": 30, "log_every": 5},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(tmp_path / "runs"), "name": name},
        "seed": 5,
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(raw)


def test_every_feature_is_sized_from_its_own_statistics(synth_data, tmp_path):
    # The plan's cardinalities line up with the batch's columns C1..C26 (stats.json keys
    # are sorted C1, C10, C11, ...; reading them positionally gave C2 the rows of C10).
    stats = load_feature_stats(synth_data)
    spec = plan_run(_config(synth_data, tmp_path, "sizes",
                            embeddings={"method": {"method": "full"}, "ratio": None}),
                    verbose=False)
    assert spec.names == list(SPARSE_COLUMNS)
    assert spec.cardinalities == [stats.num_distinct(c) for c in SPARSE_COLUMNS]
    assert spec.cardinalities[1] < spec.cardinalities[9]  # C2 is small, C10 large


@pytest.mark.parametrize("method", ["hash", "cafe", "learned_hash", "scma"])
def test_the_plan_prints_each_feature_and_lands_on_the_requested_bytes(
    synth_data, tmp_path, capsys, method
):
    spec = plan_run(_config(synth_data, tmp_path, "ratio",
                            embeddings={"ratio": 100, "method": {"method": method}}))
    out = capsys.readouterr().out
    assert "one budget over the features (frequency allocation)" in out
    assert all(f"  {name} " in out for name in spec.names)
    line = next(x for x in out.splitlines() if "serving embeddings" in x)
    assert "(requested 100x)" in line and "warning" not in line
    got = float(line.split(" bytes, ")[1].split("x smaller")[0].replace(",", ""))
    assert 100 <= got <= 105  # within 5% of the budget, from above or below
    assert "requested" not in realised_ratio(None, 1000, 10)
    assert "100.0x smaller" in realised_ratio(100, 1000, 10)


def test_a_ratio_qr_cannot_reach_is_refused_with_the_largest_it_can(synth_data, tmp_path):
    # QR cannot go below 2*sqrt(n) rows a feature.
    with pytest.raises(ConfigError, match=r"embeddings\.ratio: .* cannot be reached with qr: "
                                          r".* largest ratio it can reach here is \d+"):
        plan_run(_config(synth_data, tmp_path, "ratio",
                         embeddings={"ratio": 1000, "method": {"method": "qr"}}))


def test_a_missing_value_does_not_make_a_row_rare(synth_data):
    stats = load_feature_stats(synth_data)
    names = list(SPARSE_COLUMNS)
    hot_id = int(stats.counts("C1")[0][0])
    sparse = torch.tensor([[hot_id] + [MISSING_ID] * 25,  # missing elsewhere: still hot
                           [MISSING_ID] + [MISSING_ID] * 25,  # nothing present: hot
                           [10**12] + [MISSING_ID] * 25])  # never seen: rare
    bands = frequency_bands(stats, names, [0, 9, 21], sparse)
    assert row_bands(bands).tolist() == [FrequencyBand.HOT, FrequencyBand.HOT,
                                         FrequencyBand.RARE]


def test_single_process_run_exports_a_model_that_scores_like_the_trained_one(
    synth_data, ray_cluster, tmp_path
):
    config = _config(synth_data, tmp_path, "local")
    spec = plan_run(config, verbose=False)
    train_loop_per_worker({"spec": spec})
    model, document = load_model(config.export_dir)
    logits, labels = [], []
    for batch in iter_local_batches(synth_data, "validation", 8192):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    auc = roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())
    reported = document["metrics"]["validation_auc"]
    assert reported > 0.6, "30 steps on a teacher-labelled stream must learn something"
    assert abs(auc - reported) < 1e-6
    assert document["metrics"]["samples"] == 30 * 1024
    assert (config.run_dir / "tensorboard").is_dir()


@pytest.mark.slow
def test_one_worker_and_two_workers_train_the_same_model(synth_data, ray_cluster, tmp_path):
    results = {}
    for workers in (1, 2):
        config = _config(
            synth_data, tmp_path, f"w{workers}",
            scaling={"num_workers": workers, "plan_for_workers": 2, "cpus_per_worker": 0.5},
            schedule={"max_steps": 40, "log_every": 5},
        )
        results[workers] = run(config, verbose=False).metrics
    one, two = results[1], results[2]
    assert abs(one["validation_auc"] - two["validation_auc"]) < 0.002
    curve1, curve2 = np.array(one["loss_curve"]), np.array(two["loss_curve"])
    assert curve1.shape == curve2.shape == (8,)
    # Same global batches, same initialisation: only float summation order differs.
    np.testing.assert_allclose(curve1, curve2, rtol=2e-3)


def _expected_rows(data, config: TrainConfig) -> tuple[int, int]:
    """Rows and fingerprint of every epoch, read straight from the shards."""
    shards = config.scaling.data_shards
    total_rows, fingerprint = 0, 0
    for epoch in range(config.schedule.epochs):
        for shard in range(shards):
            pieces, steps = train_pieces(data, shard, shards, config.data.batch_size,
                                         seed=config.seed * 7919 + epoch)
            for piece in pieces:
                sparse = torch.from_numpy(transform_table(read_piece(piece))["sparse"])
                total_rows += sparse.shape[0]
                fingerprint = (fingerprint + row_fingerprint(sparse)) % FINGERPRINT_MOD
    assert total_rows == config.schedule.epochs * steps * config.data.batch_size
    return total_rows, fingerprint


@pytest.mark.slow
def test_a_worker_failure_resumes_from_checkpoint_and_sees_every_sample_once(
    synth_data, ray_cluster, tmp_path
):
    # Two epochs; the only checkpoint before the failure is taken at the first epoch's last
    # step, and the failure comes a few steps into the second epoch.
    _, steps = train_pieces(synth_data, 0, 2, 2048, seed=None)
    marker = tmp_path / "failed-once"
    config = _config(
        synth_data, tmp_path, "fault",
        data={"path": str(synth_data), "batch_size": 2048, "eval_batch_size": 8192},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
        schedule={"max_steps": None, "epochs": 2, "checkpoint_every": steps, "log_every": 10},
        fault={"step": steps + 5, "rank": 1, "marker": str(marker)},
        run={"storage_path": str(tmp_path / "runs"), "name": "fault", "max_failures": 1},
    )
    result = run(config, audit=True, verbose=False)
    assert marker.exists(), "the injected failure must have fired"
    rows, fingerprint = _expected_rows(synth_data, config)
    assert result.metrics["samples"] == rows
    assert result.metrics["step"] == 2 * steps
    assert result.metrics["epoch"] == 2
    assert result.metrics["fingerprint"] == fingerprint
    assert (config.export_dir / "model.json").is_file()


@pytest.mark.slow
def test_an_mpe_run_exports_packed_codes_that_score_like_the_trained_model(
    synth_data, ray_cluster, tmp_path
):
    config = _config(synth_data, tmp_path, "mpe", embeddings={"method": {"method": "mpe"}})
    spec = plan_run(config, verbose=False)
    train_loop_per_worker({"spec": spec})
    model, document = load_model(config.export_dir)
    mpe = [f for f in document["embeddings"].values() if f["mapper"]["kind"] == "mpe"]
    assert mpe and all(f["tables"][0]["fmt"] == "mpe" for f in mpe)
    logits, labels = [], []
    for batch in iter_local_batches(synth_data, "validation", 8192):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    auc = roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())
    assert abs(auc - document["metrics"]["validation_auc"]) < 1e-6
