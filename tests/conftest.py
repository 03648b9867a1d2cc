"""Shared fixtures: one real Ray cluster for the session, the real Criteo samples, the
exported test models that the service and the serving jobs share, and a small synthetic
dataset for the training, search and job tests."""

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


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported test models for the service and the serve/export jobs: two good ones (v1,
    v2) and the broken directories a deploy must refuse (see serving_helpers.py)."""
    from serving_helpers import broken_model_dirs, export_test_model

    root = tmp_path_factory.mktemp("models")
    v1 = export_test_model(root / "v1", seed=1, version="v1")
    v2 = export_test_model(root / "v2", seed=2, version="v2")
    return {"v1": v1, "v2": v2, **broken_model_dirs(v1, root)}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (2 days, 120,000 rows) the training, search and job tests
    share, generated once per session."""
    from jobs import synth

    out = tmp_path_factory.mktemp("synth") / "data"
    code = synth.main(["--rows", "120000", "--days", "2", "--out", str(out), "--seed", "3",
                       "--no-ray", "--no-progress"])
    assert code == 0
    return out
