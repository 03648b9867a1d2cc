"""Helpers of the serving tests (tests/services, and the serve/export jobs' in tests/jobs):
small exported models, broken copies of them, and offline reference scores.

The models are built the way the train job builds its export — a compressed embedding
collection collapsed to its serving form, a dlrm-small dense model, `export_model` — only
with random weights, so no training is needed. The offline reference scores go through the
TSV reader and `transform_table`, the path evaluation takes, never the service's code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from data_pipeline.criteo import read_criteo
from data_pipeline.schema import TERABYTE_CARDINALITIES
from data_pipeline.transforms import transform_table
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.models import model_preset
from embeddings.serving import WEIGHTS_FILE, ServingModel, export_model, load_model

UNLABELLED = "criteo_kaggle_unlabeled_sample.tsv"
LABELLED = "criteo_kaggle_sample.tsv"
TOKEN = "test-token-5f1c"
# The slow-upload guard's deadline in the Serve tests (set for the session by conftest).
BODY_DEADLINE_S = 2.0


def synthetic_samples(directory: Path, seed: int = 7) -> Path:
    """The real samples' two files, made by the synthetic generator: 13,000 labelled rows
    and the first 4,000 of them without their label (what the service tests need)."""
    from data_pipeline.synthetic import SynthConfig, write_tsv_day

    write_tsv_day(SynthConfig(rows=13_000, seed=seed), str(directory), 0)
    labelled = (directory / "day_0").read_text()
    (directory / LABELLED).write_text(labelled)
    lines = labelled.splitlines()[:4000]
    (directory / UNLABELLED).write_text("".join(line.partition("\t")[2] + "\n"
                                                for line in lines))
    return directory


def build_test_model(seed: int) -> ServingModel:
    """A random dlrm-small over hashed embeddings at 1/1000 of Terabyte's cardinalities."""
    torch.manual_seed(seed)
    cards = [max(c // 1000, 3) for c in TERABYTE_CARDINALITIES]
    config = CollectionConfig(dim=16, cardinalities=cards, method={"method": "hash"}, ratio=10)
    serving = EmbeddingCollection(config).collapse()
    spec = model_preset("dlrm-small")
    dense = spec.build()
    with torch.no_grad():
        # A fresh DLRM scores everything near 0.5; a steeper logit spreads the scores over
        # (0, 1), so agreeing to 1e-5 says something.
        dense.top[-1].weight.mul_(40)
    return ServingModel(spec, dense, serving.names, list(serving.embeddings.values()))


def export_test_model(directory: Path, seed: int, version: str | None = None) -> Path:
    metadata = {"version": version} if version else {}
    return export_model(build_test_model(seed), directory, metadata)


def broken_model_dirs(good: Path, root: Path) -> dict[str, Path]:
    """Directories a deploy must refuse, made from the good model at `good` under `root`:
    "missing", "truncated" (half its weights) and "checksum" (one flipped byte)."""
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Same size, one flipped byte deep inside a tensor: only the checksum can tell.
    corrupted = root / "checksum"
    shutil.copytree(good, corrupted)
    data = bytearray((corrupted / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (corrupted / WEIGHTS_FILE).write_bytes(bytes(data))
    return {"missing": root / "does-not-exist", "truncated": truncated, "checksum": corrupted}


def offline_probabilities(model_dir: Path, tsv: Path) -> np.ndarray:
    """P(click) for every row of a TSV: reader → transform_table → load_model → sigmoid."""
    table, _, rejects = read_criteo(tsv)
    assert not rejects
    inputs = transform_table(table)
    model, _ = load_model(model_dir)
    with torch.inference_mode():
        logits = model(torch.from_numpy(inputs["dense"]), torch.from_numpy(inputs["sparse"]))
    return torch.sigmoid(logits).numpy()


def raw_tsv_rows(tsv: Path) -> list[dict[str, list]]:
    """Request rows straight from the TSV text (a parser independent of the service's)."""
    rows = []
    for line in tsv.read_text().splitlines():
        fields = line.split("\t")
        fields = fields[-39:]  # drop a label column if there is one
        rows.append({
            "dense": [int(v) if v else None for v in fields[:13]],
            "categorical": [v or None for v in fields[13:]],
        })
    return rows
