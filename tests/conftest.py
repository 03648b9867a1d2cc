"""Shared fixtures: one real Ray cluster for the session, and the real Criteo samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    return Path(os.environ.get("EMBPRESS_REAL_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of the real Criteo samples; tests skip visibly without it, CI fails instead."""
    path = real_data_dir()
    if not (path / "criteo_kaggle_sample.tsv").is_file():
        if os.environ.get("EMBPRESS_REQUIRE_REAL_DATA"):
            pytest.fail(f"real Criteo samples missing at {path} (EMBPRESS_REAL_DATA)")
        pytest.skip(f"real Criteo samples not found at {path}; set EMBPRESS_REAL_DATA")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 cores: CPUs given explicitly)."""
    import ray
    import torch

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            # Stated, not detected: a GPU Ray misses leaves use_gpu workers waiting forever.
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
    yield ray
    ray.shutdown()
