"""The training job on a GPU: a single-process run and a Ray Train worker with `use_gpu`
(NCCL, the worker's CUDA device) train the model the CPU trains and export one that scores
alike on the CPU. CI has no GPU, so these skip there with the reason."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.datasets import iter_local_batches
from embeddings.metrics import roc_auc
from embeddings.serving import load_model
from training.config import TrainConfig
from training.plan import plan_run
from training.run import run
from training.worker import train_loop_per_worker

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here; the GPU path runs on a GPU machine"
)


def _config(root, tmp_path, name: str, use_gpu: bool, workers: int = 0,
            **sections: dict) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"path": str(root), "batch_size": 1024, "eval_batch_size": 8192},
        # CAFE over MLET: the adaptive method (sketch on the host, rows on the device).
        "embeddings": {"ratio": 10, "method": {"method": "cafe", "mlet_dim": 64}},
        "schedule": {"max_steps": 40, "log_every": 5},
        "scaling": {"num_workers": workers, "use_gpu": use_gpu, "cpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": name},
        "seed": 5,
        **sections,
    })


def _exported_auc(config: TrainConfig, data) -> tuple[float, dict]:
    """AUC of the exported model scored on the CPU, and the metrics the run reported."""
    model, document = load_model(config.export_dir)
    logits, labels = [], []
    for batch in iter_local_batches(data, "validation", 8192):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    return roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy()), document["metrics"]


def test_single_process_gpu_run_trains_what_the_cpu_trains(synth_data, ray_cluster, tmp_path):
    metrics = {}
    for use_gpu in (False, True):
        config = _config(synth_data, tmp_path, f"gpu-{use_gpu}", use_gpu)
        train_loop_per_worker({"spec": plan_run(config, verbose=False)})
        auc, metrics[use_gpu] = _exported_auc(config, synth_data)
        assert abs(auc - metrics[use_gpu]["validation_auc"]) < 1e-4, (use_gpu, auc, metrics)
    gpu, cpu = metrics[True], metrics[False]
    assert gpu["validation_auc"] > 0.6
    assert abs(gpu["validation_auc"] - cpu["validation_auc"]) < 0.003, (gpu, cpu)
    assert gpu["samples"] == cpu["samples"] == 40 * 1024


def test_ray_train_gpu_worker_trains_over_nccl(synth_data, ray_cluster, tmp_path):
    single = _config(synth_data, tmp_path, "gpu-single", use_gpu=True)
    train_loop_per_worker({"spec": plan_run(single, verbose=False)})
    _, expected = _exported_auc(single, synth_data)

    config = _config(synth_data, tmp_path, "gpu-worker", use_gpu=True, workers=1)
    result = run(config, verbose=False).metrics
    auc, _ = _exported_auc(config, synth_data)
    assert abs(auc - result["validation_auc"]) < 1e-4
    # One GPU worker sees the batches the single process sees: the same model, up to the
    # order of float sums on the device.
    assert abs(result["validation_auc"] - expected["validation_auc"]) < 0.003
    assert result["samples"] == 40 * 1024
    assert result["device"].startswith("cuda")


def test_a_gpu_worker_resumes_from_its_checkpoint(synth_data, ray_cluster, tmp_path):
    # The checkpoint is loaded onto the GPU: CAFE's sketch, the tables and their optimizer
    # state come back, and a run that fails at step 15 and resumes from step 10's checkpoint
    # ends where the uninterrupted run does.
    marker = tmp_path / "failed-once"
    results = []
    for name, fault in (("steady", None), ("fault", {"step": 15, "rank": 0,
                                                    "marker": str(marker)})):
        config = _config(synth_data, tmp_path, name, use_gpu=True, workers=1,
                         schedule={"max_steps": 30, "checkpoint_every": 10, "log_every": 10},
                         **({"fault": fault} if fault else {}))
        results.append(run(config, verbose=False).metrics)
    assert marker.exists(), "the injected failure must have fired"
    steady, resumed = results
    assert resumed["device"].startswith("cuda")
    assert resumed["step"] == steady["step"] == 30
    assert resumed["samples"] == 30 * 1024
    assert abs(resumed["validation_auc"] - steady["validation_auc"]) < 0.002, (resumed, steady)
