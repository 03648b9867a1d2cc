"""The serving form stands alone: importing the scoring service (or the model loader) loads no
training code: no CAFE sketch, no sharding, no collection or table store, no optimizers, and
no numba. Each check runs in a fresh interpreter, so what other tests imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every `embeddings` module the serving form may load.
SERVING_MODULES = frozenset({
    "embeddings",
    "embeddings.budget",
    "embeddings.mapping",
    "embeddings.models",
    "embeddings.models.common",
    "embeddings.models.dcn",
    "embeddings.models.dlrm",
    "embeddings.models.presets",
    "embeddings.serving",
    "embeddings.serving_embedding",
    "embeddings.serving_io",
    "embeddings.serving_mpe",
    "embeddings.serving_tables",
})

# Training code serving must never load (a name here also forbids its submodules).
FORBIDDEN = (
    "embeddings.methods",
    "embeddings.hotsketch",
    "embeddings.sharding",
    "embeddings.collection",
    "embeddings.optim",
    "embeddings.tables",
    "embeddings.metrics",
    "jobs",
    "numba",
)


def _loaded_after(module: str) -> list[str]:
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["services.scoring", "services.app", "embeddings.serving"])
def test_serving_imports_no_training_code(module: str) -> None:
    loaded = _loaded_after(module)
    forbidden = [
        m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not forbidden, f"importing {module} loaded training code: {forbidden}"
    unexpected = [
        m for m in loaded
        if (m == "embeddings" or m.startswith("embeddings.")) and m not in SERVING_MODULES
    ]
    assert not unexpected, f"importing {module} loaded non-serving modules: {unexpected}"
    assert module in loaded


def test_numba_scalar_hash_is_still_there_for_kernels() -> None:
    """The hash module compiles its numba twin only when a kernel asks for it."""
    code = (
        "import sys\n"
        "import idhash.splitmix as h\n"
        "assert 'numba' not in sys.modules\n"
        "from idhash.splitmix import hash64_scalar\n"
        "import numba\n"
        "assert isinstance(hash64_scalar, numba.core.registry.CPUDispatcher)\n"
        "assert h.hash64_scalar is hash64_scalar\n"
        "assert 'hash64_scalar' in dir(h)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
