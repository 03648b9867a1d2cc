"""Serving fixtures: Criteo rows and the test models' offline scores (the models themselves,
good and broken, are tests/conftest.py's `model_dirs`, shared with the serving jobs' tests).

The Serve tests run with direct ingress on and the slow-upload guard in front of the proxy
and the replicas, as `python -m jobs.serve --direct-ingress` runs them. Serve's processes read
these variables when Ray starts them, so they are set here, as the test session collects,
before any test starts Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import BODY_DEADLINE_S, UNLABELLED, offline_probabilities, synthetic_samples

from services.guard import CALLBACK, CALLBACK_ENV, DEADLINE_ENV

for _name, _value in {
    CALLBACK_ENV: CALLBACK,
    DEADLINE_ENV: str(BODY_DEADLINE_S),
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # A replaced replica's port would otherwise stay open 30 s, and serve.shutdown with it.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def criteo_samples(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Criteo samples where present (CI requires them), else the same two files
    from the synthetic generator, so the service is tested on a fresh clone too."""
    try:
        return request.getfixturevalue("real_data")
    except pytest.skip.Exception:
        return synthetic_samples(tmp_path_factory.mktemp("synthetic-samples"))


@pytest.fixture(scope="session")
def unlabelled_tsv(criteo_samples: Path) -> Path:
    return criteo_samples / UNLABELLED


@pytest.fixture(scope="session")
def offline_scores(model_dirs: dict[str, Path], unlabelled_tsv: Path) -> dict[str, np.ndarray]:
    return {v: offline_probabilities(model_dirs[v], unlabelled_tsv) for v in ("v1", "v2")}
