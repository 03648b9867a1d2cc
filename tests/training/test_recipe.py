"""The training recipe of issue 15 on real rows: early stopping exports the best model, the
first-order term trains, exports and serves, the dense learning rate decays by step."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from data_pipeline.datasets import iter_local_batches
from embeddings.metrics import roc_auc
from embeddings.serving import load_model
from jobs import prepare
from jobs.config import ConfigError, load_config
from training.checkpoint import BEST_DIR, RANK_FILE
from training.config import TrainConfig
from training.plan import plan_run
from training.run import run
from training.settings import OptimizerSettings
from training.worker import train_loop_per_worker

PRESET = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "criteo_kaggle_sample.yaml"


@pytest.fixture(scope="module")
def kaggle_rows(real_data, tmp_path_factory) -> Path:
    """The 13,000 shared Kaggle rows as shards (6/7 train, 929 validation, 929 test)."""
    out = tmp_path_factory.mktemp("kaggle") / "data"
    code = prepare.main(["--input", str(real_data / "criteo_kaggle_sample.tsv"),
                         "--output", str(out), "--no-ray", "--no-progress"])
    assert code == 0
    return out


def _overfitting_config(data: Path, tmp_path: Path, name: str, **scaling) -> TrainConfig:
    # Uncompressed tables on 11k rows: validation AUC peaks after the first epoch and falls
    # from the second (issue 15's table), so patience 1 must stop at epoch 2 and export
    # epoch 1's model.
    return TrainConfig.model_validate({
        "data": {"path": str(data), "batch_size": 256, "eval_batch_size": 4096,
                 "block_rows": 2048},
        "model": {"kind": "dlrm", "first_order": True},
        "embeddings": {"method": {"method": "full"}},
        "optimizer": {"dense_lr_decay": "none"},
        "schedule": {"epochs": 4, "log_every": 20,
                     "early_stopping": {"metric": "validation_auc", "patience": 1}},
        "scaling": {"num_workers": 0, **scaling},
        "run": {"storage_path": str(tmp_path / "runs"), "name": name},
        "seed": 1,
    })


def _scores(model, data: Path, split: str) -> float:
    logits, labels = [], []
    for batch in iter_local_batches(data, split, 4096):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    return roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def _assert_exported_the_best(config: TrainConfig, data: Path) -> dict:
    model, document = load_model(config.export_dir)
    metrics = document["metrics"]
    steps_per_epoch = math.ceil(11_142 // 256)
    assert metrics["stopped"] == 1, "the run overfits: early stopping must end it"
    assert metrics["best_step"] < metrics["step"]
    assert metrics["best_step"] == steps_per_epoch  # the first epoch was the best
    # The exported model is the best evaluation's: it scores the validation rows exactly as
    # that evaluation did, and its weights are the saved best state's, not the last step's.
    assert _scores(model, data, "validation") == pytest.approx(metrics["best_value"], abs=1e-6)
    assert metrics["validation_auc"] == pytest.approx(metrics["best_value"], abs=1e-6)
    assert _scores(model, data, "test") == pytest.approx(metrics["test_auc"], abs=1e-6)
    best = torch.load(config.run_dir / BEST_DIR / RANK_FILE.format(rank=0), weights_only=True)
    for k, v in best["dense"].items():
        torch.testing.assert_close(model.dense.state_dict()[k], v)
    # The first-order term made the tables d + 1 wide, and serving reads them whole.
    assert document["model"]["first_order"] is True
    batch = next(iter_local_batches(data, "validation", 8))
    assert model.embeddings[0](batch["sparse"][:, 0]).shape == (8, 17)
    return metrics


def test_early_stopping_exports_the_best_epochs_model_not_the_last(
    kaggle_rows, ray_cluster, tmp_path
):
    config = _overfitting_config(kaggle_rows, tmp_path, "stop")
    train_loop_per_worker({"spec": plan_run(config, verbose=False)})
    _assert_exported_the_best(config, kaggle_rows)


@pytest.mark.slow
def test_early_stopping_under_ray_train_with_two_workers(kaggle_rows, ray_cluster, tmp_path):
    config = _overfitting_config(kaggle_rows, tmp_path, "stop2", num_workers=2,
                                 cpus_per_worker=0.5)
    result = run(config, verbose=False)
    metrics = _assert_exported_the_best(config, kaggle_rows)
    assert result.metrics["best_step"] == metrics["best_step"]
    # Each rank kept its own part of the best model.
    assert (config.run_dir / BEST_DIR / RANK_FILE.format(rank=1)).is_file()


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_dense_lr_decays_from_the_rate_to_the_floor_by_step_alone(kind):
    opt = OptimizerSettings(dense_lr=1e-3, dense_lr_decay=kind, dense_lr_floor=0.1)
    rates = [opt.dense_lr_at(s, 100) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert min(rates) >= 1e-4 - 1e-12
    if kind != "step":
        assert rates[-1] == pytest.approx(1e-4)
    else:
        assert rates[25] == pytest.approx(5e-4) and rates[-1] == pytest.approx(1.25e-4)
    # A resumed run recomputes the rate from its checkpointed step: nothing else to restore.
    assert OptimizerSettings(dense_lr=1e-3).dense_lr_at(70, 100) == 1e-3


def test_the_kaggle_sample_preset_loads_and_bad_recipe_values_name_their_field(tmp_path):
    config = load_config(PRESET, TrainConfig)
    assert config.schedule.early_stopping is not None
    assert config.model_spec.first_order and config.model_spec.table_dim == 17
    bad = tmp_path / "bad.yaml"
    for field, text in (("optimizer.dense_lr_floor", "optimizer: {dense_lr_floor: 0}"),
                        ("optimizer.sparse_weight_decay",
                         "optimizer: {sparse_weight_decay: -1}"),
                        ("schedule.early_stopping.patience",
                         "schedule: {early_stopping: {patience: 0}}")):
        bad.write_text(f"data: {{path: {tmp_path}}}\n{text}\n")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(bad, TrainConfig)
