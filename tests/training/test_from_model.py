"""Two-stage training (`from_model`): a trained model's export seeds low-rank features and the
dense layers, the fine-tuned model exports and serves exactly as it trained, a resumed model
restores its state, and a bad from_model fails at start naming the field."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from data_pipeline.datasets import iter_local_batches
from data_pipeline.stats import load_feature_stats
from embeddings.metrics import roc_auc
from embeddings.serving import load_model
from training.config import ConfigError, TrainConfig
from training.context import WorkerContext
from training.from_model import check_from_model
from training.model import build_model
from training.plan import LazyFeatureStats, cardinalities_of, plan_run
from training.worker import train_loop_per_worker


def _config(root, tmp_path, name, **overrides) -> TrainConfig:
    raw = {
        "data": {"path": str(root), "batch_size": 1024, "eval_batch_size": 8192},
        "embeddings": {"method": {"method": "full"}},
        "schedule": {"max_steps": 20, "log_every": 10},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(tmp_path / "runs"), "name": name},
        "seed": 5,
    }
    raw.update(overrides)
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def trained_dir(synth_data, ray_cluster, tmp_path_factory):
    """A small uncompressed model, trained and exported once for this module."""
    tmp = tmp_path_factory.mktemp("first_stage")
    config = _config(synth_data, tmp, "full")
    train_loop_per_worker({"spec": plan_run(config, verbose=False)})
    return config.export_dir


def _served_auc(model_dir, data) -> float:
    model, _ = load_model(model_dir)
    logits, labels = [], []
    for batch in iter_local_batches(data, "validation", 8192):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    return roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def test_low_rank_from_a_trained_model_fine_tunes_exports_and_serves_exactly(
    synth_data, trained_dir, tmp_path
):
    config = _config(synth_data, tmp_path, "lowrank", from_model=str(trained_dir),
                     embeddings={"method": {"method": "lowrank", "ratio": 4}})
    spec = plan_run(config, verbose=False)
    train_loop_per_worker({"spec": spec})
    model, document = load_model(config.export_dir)
    dim = config.model_spec.table_dim
    k = dim // 4
    first, _ = load_model(trained_dir)
    for emb, before in zip(model.embeddings, first.embeddings, strict=True):
        assert emb.projection is not None and emb.projection.shape == (k, dim)
        assert all(t.width == k for t in emb.tables)
        rows = sum(t.rows for t in before.tables)
        mapper = emb.mapper.state_bytes()
        assert emb.serving_bytes() == mapper + 4 * (rows * k + k * dim + dim)
    # The export scores as the trained model did (its reported AUC), and training learnt.
    reported = document["metrics"]["validation_auc"]
    assert abs(_served_auc(config.export_dir, synth_data) - reported) < 1e-6
    # A search trial counts the bytes it will serve before training, from the trained model.
    from training.search.trial import planned_serving_bytes

    assert planned_serving_bytes(spec, config) == document["serving_bytes"]["embeddings"]
    first_document = load_model(trained_dir)[1]
    # Fine-tuning goes on from the trained model: no worse than it after as many steps.
    assert reported > first_document["metrics"]["validation_auc"] - 0.005
    assert document["serving_bytes"]["embeddings"] < first_document["serving_bytes"][
        "embeddings"] / 2


def test_early_stopping_judges_the_start_so_a_fine_tuning_that_only_loses_keeps_it(
    synth_data, trained_dir, tmp_path
):
    # Learning rates no fine-tuning survives: every evaluation after the start is worse.
    config = _config(
        synth_data, tmp_path, "start_kept", from_model=str(trained_dir),
        embeddings={"method": {"method": "lowrank", "rank": 8}},
        optimizer={"sparse_lr": 50.0, "dense_lr": 5.0},
        schedule={"max_steps": 20, "log_every": 10, "eval_every": 5,
                  "early_stopping": {"metric": "validation_auc", "patience": 2}},
    )
    train_loop_per_worker({"spec": plan_run(config, verbose=False)})
    document = load_model(config.export_dir)[1]
    metrics = document["metrics"]
    assert metrics["best_step"] == 0 and metrics["step"] > 0
    # The export is the start, judged before the first step: it scores as that judgement.
    assert abs(metrics["validation_auc"] - metrics["best_value"]) < 1e-6
    assert abs(_served_auc(config.export_dir, synth_data) - metrics["best_value"]) < 1e-6


def test_a_resumed_two_stage_model_restores_its_state_not_a_new_derivation(
    synth_data, trained_dir, tmp_path
):
    config = _config(synth_data, tmp_path, "resume", from_model=str(trained_dir),
                     embeddings={"method": {"method": "lowrank", "rank": 3}})
    spec = plan_run(config, verbose=False)
    ctx = WorkerContext.current(False)
    stats = LazyFeatureStats(load_feature_stats(synth_data))
    model = build_model(spec, ctx, stats)
    batch = next(iter(iter_local_batches(synth_data, "validation", 512)))
    loss = model(batch["dense"], batch["sparse"]).pow(2).mean()
    model.step(loss, 1e-2)  # moves tables, projections, biases and the MLPs off their start
    state = {**model.weights(), **model.optimizer_state()}
    resumed = build_model(spec, ctx, stats)
    with torch.no_grad():
        fresh = resumed(batch["dense"], batch["sparse"])
        resumed.load_weights(state)
        resumed.load_optimizer_state(state)
        want = model(batch["dense"], batch["sparse"])
        assert not torch.allclose(fresh, want), "the step must have changed the model"
        assert torch.equal(resumed(batch["dense"], batch["sparse"]), want)


def test_dense_layers_start_from_the_trained_model(synth_data, trained_dir, tmp_path):
    config = _config(synth_data, tmp_path, "init", from_model=str(trained_dir),
                     embeddings={"method": {"method": "lowrank", "rank": 3}})
    model = build_model(plan_run(config, verbose=False), WorkerContext.current(False),
                        LazyFeatureStats(load_feature_stats(synth_data)))
    trained, _ = load_model(trained_dir)
    ours, theirs = model.dense_module.state_dict(), trained.dense.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_bad_from_model_fails_at_start_naming_the_field(synth_data, trained_dir, tmp_path):
    lowrank = {"method": {"method": "lowrank", "rank": 3}}
    with pytest.raises(ValidationError, match="from_model"):
        _config(synth_data, tmp_path, "none", embeddings=lowrank)
    with pytest.raises(ValidationError, match="from_model"):
        _config(synth_data, tmp_path, "missing", embeddings=lowrank,
                from_model=str(tmp_path / "nowhere"))
    wider = _config(synth_data, tmp_path, "wide", embeddings=lowrank,
                    from_model=str(trained_dir), model={"kind": "dlrm", "embedding_dim": 32,
                                                        "bottom_mlp": [64, 32]})
    with pytest.raises(ConfigError, match=r"from_model: .* 16-wide tables; this run's are 32"):
        plan_run(wider, verbose=False)
    names = [f"C{i}" for i in range(1, 26)]  # one feature short
    with pytest.raises(ConfigError, match=r"from_model: .*extra \['C26'\]"):
        check_from_model(wider, names)


def test_a_ratio_mec_cannot_reach_is_one_refusal_carrying_the_smallest_bytes(
    synth_data, trained_dir, tmp_path
):
    from embeddings.budget import BudgetUnreachable

    config = _config(synth_data, tmp_path, "mec", from_model=str(trained_dir),
                     embeddings={"ratio": 1000, "method": {"method": "mec", "steps": 2}})
    with pytest.raises(ConfigError, match=r"embeddings\.method: mec cannot reach ratio 1000 "
                                          r".*its largest ratio is [\d.]+ \(and \d+ more") as e:
        plan_run(config, verbose=False)
    cause = e.value.__cause__
    assert isinstance(cause, BudgetUnreachable)
    # Every coded row costs 6 bytes of codes at least; the rest are planned as they are.
    uncompressed = 4 * 16 * sum(cardinalities_of(load_feature_stats(synth_data))[1])
    assert 0 < cause.smallest_bytes < uncompressed
    assert cause.largest_ratio == pytest.approx(uncompressed / cause.smallest_bytes)
    assert cause.largest_ratio < 1000
