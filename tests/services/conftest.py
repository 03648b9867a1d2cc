"""Serving fixtures: good and broken exported models, and their offline scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import UNLABELLED, export_test_model, offline_probabilities

from embeddings.serving import WEIGHTS_FILE


@pytest.fixture(scope="session")
def unlabelled_tsv(real_data: Path) -> Path:
    return real_data / UNLABELLED


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two good models (v1, v2) and the broken directories a deploy must refuse."""
    root = tmp_path_factory.mktemp("models")
    v1 = export_test_model(root / "v1", seed=1, version="v1")
    v2 = export_test_model(root / "v2", seed=2, version="v2")

    truncated = root / "truncated"
    shutil.copytree(v1, truncated)
    weights = truncated / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Same size, one flipped byte deep inside a tensor: only the checksum can tell.
    corrupted = root / "checksum"
    shutil.copytree(v1, corrupted)
    data = bytearray((corrupted / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (corrupted / WEIGHTS_FILE).write_bytes(bytes(data))

    return {"v1": v1, "v2": v2, "missing": root / "does-not-exist",
            "truncated": truncated, "checksum": corrupted}


@pytest.fixture(scope="session")
def offline_scores(model_dirs: dict[str, Path], unlabelled_tsv: Path) -> dict[str, np.ndarray]:
    return {v: offline_probabilities(model_dirs[v], unlabelled_tsv) for v in ("v1", "v2")}
