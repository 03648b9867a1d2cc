"""Starting a training run on Ray Train: plan it on the driver, then a `TorchTrainer` whose
workers run `training.worker.train_loop_per_worker`. A rerun with the same run name resumes
from the run's latest checkpoint."""

from __future__ import annotations

import os
from typing import Any

from training.config import TrainConfig
from training.plan import plan_run
from training.preflight import check_schedulable
from training.stall import StallWatch, heartbeat_actor
from training.worker import WORKER_LOG_LEVEL_ENV, train_loop_per_worker

LOG_LEVEL_ENV = "EMBPRESS_LOG_LEVEL"


def train_log_level() -> str:
    """Ray Train's console log level: `EMBPRESS_LOG_LEVEL` (`--verbose`: INFO), WARNING by
    default."""
    return os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()


def run(
    config: TrainConfig, audit: bool = False, verbose: bool = True,
    callbacks: list[Any] | None = None,
) -> Any:
    """Train as configured; returns the Ray Train result (metrics of rank 0, checkpoint).

    `callbacks` are Ray Train user callbacks (a Tune trial passes its TuneReportCallback).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    check_schedulable(scaling)
    spec = plan_run(config, verbose)
    heartbeat = heartbeat_actor(
        f"Ray to start the worker group ({scaling.num_workers} × "
        f"{scaling.cpus_per_worker:g} CPU" + (" + 1 GPU" if scaling.use_gpu else "") + ")")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "audit": audit, "heartbeat": heartbeat},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker,
                                  **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=str(config.run.storage_path.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train patches `print` in its workers to log through the root logger and,
            # when stdout is wrapped, to print as well: each progress line reached the
            # driver twice. Workers print plainly; their stdout still reaches the driver.
            # Ray Train's own INFO lines (resource requests, a TrainingReport dump per rank
            # and report, every checkpoint) buried the run's progress and result; warnings
            # and errors still show. EMBPRESS_LOG_LEVEL=INFO brings them back.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                             WORKER_LOG_LEVEL_ENV: train_log_level()}},
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
        ),
    )
    try:
        with StallWatch(heartbeat, config.run.stall_timeout_s):
            return trainer.fit()
    finally:
        ray.kill(heartbeat)
