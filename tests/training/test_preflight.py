"""A run the cluster cannot schedule is refused before any worker starts, naming the field,
what the cluster has and a value that fits (issue 19), instead of hanging forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.preflight import Node, fits, fitting_cpus, unschedulable_reason
from training.settings import ScalingSettings

REPO = Path(__file__).resolve().parents[2]
TWO_SMALL_NODES = [Node(1, 0), Node(1, 0)]


def test_workers_that_take_every_cpu_leave_the_reads_nothing() -> None:
    # The case: one worker per 1-CPU node, no CPU left for Ray Data's reads.
    assert not fits(TWO_SMALL_NODES, workers=2, cpus=1, gpus=0, data_cpus=0.5)
    assert fits(TWO_SMALL_NODES, workers=2, cpus=0.5, gpus=0, data_cpus=0.5)
    assert fits([Node(2, 0), Node(2, 0)], workers=2, cpus=1.5, gpus=0, data_cpus=0.5)
    # A worker larger than every node never fits, whatever the total.
    assert not fits([Node(1, 0)] * 8, workers=1, cpus=1.5, gpus=0, data_cpus=0.5)


def test_the_message_names_the_field_the_cluster_and_a_value_that_fits() -> None:
    scaling = ScalingSettings(num_workers=2, cpus_per_worker=1)
    reason = unschedulable_reason(scaling, TWO_SMALL_NODES, data_cpus=0.5)
    assert reason is not None
    assert reason.startswith("scaling.cpus_per_worker:")
    assert "2 node(s): 1 CPU, 1 CPU" in reason
    assert "scaling.cpus_per_worker: 0.5 would fit" in reason
    assert fitting_cpus(TWO_SMALL_NODES, 2, 0, 0.5) == 0.5
    assert unschedulable_reason(ScalingSettings(num_workers=2, cpus_per_worker=0.5),
                                TWO_SMALL_NODES, data_cpus=0.5) is None


def test_gpu_workers_need_a_gpu_each() -> None:
    scaling = ScalingSettings(num_workers=2, cpus_per_worker=1, use_gpu=True)
    reason = unschedulable_reason(scaling, [Node(8, 1)], data_cpus=0.5)
    assert reason is not None and reason.startswith("scaling.num_workers:")
    assert "GPUs for 1 worker" in reason
    assert unschedulable_reason(scaling, [Node(8, 2)], data_cpus=0.5) is None


def test_the_train_job_refuses_what_the_cluster_cannot_run(synth_data, ray_cluster, tmp_path):
    # The session's cluster has 4 CPUs: 4 workers × 1 CPU would leave the reads none.
    config = {
        "data": {"path": str(synth_data), "batch_size": 1024},
        "embeddings": {"ratio": 10, "method": {"method": "hash"}},
        "schedule": {"max_steps": 2},
        "scaling": {"num_workers": 4, "cpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "too_big"},
    }
    path = tmp_path / "too_big.yaml"
    path.write_text(yaml.safe_dump(config))
    env_address = ray_cluster.get_runtime_context().gcs_address
    job = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": env_address})
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    assert "error: scaling.cpus_per_worker: 4 workers × 1 CPU" in job.stderr
    assert "scaling.cpus_per_worker: 0.85 would fit" in job.stderr
    assert not (tmp_path / "runs" / "too_big").exists() or not any(
        (tmp_path / "runs" / "too_big").rglob("checkpoint_*")), "no worker may have started"


def test_the_tune_job_refuses_before_any_trial(synth_data, ray_cluster, tmp_path):
    from search_helpers import raw_search

    raw = raw_search(synth_data, tmp_path, "too_big",
                     scaling={"num_workers": 4, "cpus_per_worker": 1})
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    job = subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ,
                              "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address})
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    assert "error: scaling.cpus_per_worker: 4 workers × 1 CPU" in job.stderr
    assert not (tmp_path / "tune" / "too_big").exists() or not any(
        (tmp_path / "tune" / "too_big").glob("trial_*")), "no trial may have started"


@pytest.mark.parametrize("value", [-1, "soon"])
def test_a_bad_wait_names_its_field(value) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="wait_for_resources_s"):
        ScalingSettings(wait_for_resources_s=value)
