"""The serving model out of a training run: every worker collapses its shards, rank 0
gathers them and writes the export; and the re-export of an export with quantised tables,
checked against its source before it replaces anything."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.stats import load_feature_stats
from embeddings.budget import ExportQuantize
from embeddings.methods.quantize import quantize_collection_mixed
from embeddings.serving import (
    COMPUTED_KEYS,
    MODEL_FILE,
    ModelFileError,
    ServingModel,
    SplitServingEmbedding,
    export_model,
    load_model,
)
from embeddings.serving_embedding import ServingCollection, ServingEmbedding
from embeddings.serving_io import embedding_from_state, embedding_state
from embeddings.serving_tables import ServingTable
from embeddings.sharding.router import ShardedEmbeddingCollection, module_key
from training.context import WorkerContext
from training.model import TrainableModel
from training.plan import LazyFeatureStats, RunSpec

State = tuple[dict[str, Any], dict[str, torch.Tensor]]


def gather_serving(ctx: WorkerContext, embeddings: ShardedEmbeddingCollection
                   ) -> list[nn.Module] | None:
    """Collapse this worker's shards; rank 0 receives everyone's, one serving embedding per
    feature in plan order (None elsewhere). A collective: every worker calls it."""
    local = {key: _host_state(module) for key, module in embeddings.owned.items()}
    if ctx.rank == 0:
        local.update({key: _host_state(m) for key, m in embeddings.replicated.items()})
    if ctx.distributed:
        parts: list[Any] = [None] * ctx.world
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    if ctx.rank != 0:
        return None
    states: dict[str, State] = {k: v for p in parts for k, v in p.items()}

    def serving(name: str, shard: int, num_shards: int) -> nn.Module:
        config, tensors = states[module_key(name, shard, num_shards)]
        return embedding_from_state(config, tensors, "")

    out: list[nn.Module] = []
    for f in embeddings.plan.features:
        if f.num_shards == 1:
            out.append(serving(f.name, 0, 1))
        else:
            shards = [serving(f.name, s, f.num_shards) for s in range(f.num_shards)]
            out.append(SplitServingEmbedding(shards, embeddings.embedding_dim))
    return out


def _host_state(module: nn.Module) -> State:
    # Collapsed on the worker's device, gathered and exported from host memory: a CUDA
    # tensor sent through all_gather_object would land on the sender's GPU index.
    config, tensors = embedding_state(module.collapse(), "")
    return config, {k: v.cpu() for k, v in tensors.items()}


def export_trained(spec: RunSpec, ctx: WorkerContext, model: TrainableModel,
                   metrics: dict[str, Any], step: int) -> None:
    """Write the run's serving model (rank 0; a collective for all); adds its
    "serving_bytes" to `metrics`, which the export records."""
    serving = gather_serving(ctx, model.embeddings)
    if serving is None:
        return
    config = spec.config
    quantize = config.export.quantize.value
    served = ServingModel(config.model_spec, model.dense_module.cpu(), spec.names, serving)
    served = served.quantize(quantize)
    metrics["serving_bytes"] = served.embedding_bytes()
    export_model(served, config.export_dir, {
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "training_config": config.model_dump(mode="json"),
        "quantize": quantize,
        "compression_ratio": spec.ratio,
        "version": f"{config.run.name}-step{step}",
    })
    print(f"[train] exported the serving model to {config.export_dir}", flush=True)


class ExportError(RuntimeError):
    """The export cannot be made; the message says why."""


def _check_source(model_dir: Path) -> None:
    """Refuse a folder that is no export, saying what it looks like instead."""
    if model_dir.is_dir() and not (model_dir / MODEL_FILE).exists():
        shards = [p.name for p in model_dir.iterdir() if p.suffix == ".pt" or "rank" in p.name]
        hint = (" It looks like a Ray Train checkpoint: the train job exports the serving "
                "model at its end (export.out, default <run folder>/model); re-export from "
                "that folder." if shards else "")
        raise ExportError(f"{model_dir} has no {MODEL_FILE}: not an exported model.{hint}")


def _agreement(source: nn.Module, copy: nn.Module) -> float:
    """Largest probability difference between two models on random Criteo-like rows."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.log1p(torch.randint(0, 1000, (4096, 13), generator=generator).float())
    sparse = torch.randint(0, 2**32, (4096, 26), generator=generator)
    with torch.inference_mode():
        a = torch.sigmoid(source(dense, sparse))
        b = torch.sigmoid(copy(dense, sparse))
    return float((a - b).abs().max())


def reexport(model_dir: Path, out: Path, fmt: ExportQuantize | str,
             version: str | None = None) -> dict[str, Any]:
    """Write a copy of the export in `model_dir` to `out` with its tables stored as `fmt`;
    a summary of what was written. `out` appears only once the copy loads and scores like
    the source (exactly for "none", within the format's bound otherwise)."""
    fmt = ExportQuantize(fmt).value
    source, document = _load_source(model_dir, out, quantising=fmt != "none")
    metadata = _copy_metadata(model_dir, document, fmt, version)
    written, error = _write_checked(source, source.quantize(fmt), out, metadata, fmt)
    return _summary(out, metadata, document, written, error)


def reexport_mixed(model_dir: Path, out: Path, budget_bytes: int, data: Path | None = None,
                   version: str | None = None) -> dict[str, Any]:
    """Write a copy of the export in `model_dir` to `out` whose rows each take int4, int8 or
    fp16 by how often the data reads them, so the embeddings fit `budget_bytes`
    (`quantize_collection_mixed`: frequency-banded post-training mixed precision, the
    baseline MPE's learned widths are measured against). Access counts come from the
    statistics of `data` (default: the training data the model.json names)."""
    source, document = _load_source(model_dir, out, quantising=True)
    if data is None:
        named = document.get("training_config", {}).get("data", {}).get("path")
        if not named:
            raise ExportError("--data: model.json names no training data; give the prepared "
                              "data folder whose statistics count each row's accesses")
        data = Path(named)
    try:
        stats = LazyFeatureStats(load_feature_stats(data))
    except (OSError, ValueError) as exc:
        raise ExportError(f"--data: no statistics to count row accesses at {data} ({exc}); "
                          "give the prepared data folder the model trained on") from None
    plain = [e for e in source.embeddings if not isinstance(e, ServingEmbedding)
             or not all(isinstance(t, ServingTable) for t in e.tables)]
    if plain:
        raise ExportError("mixed precision re-encodes plain fp32 tables; this model has "
                          f"{len(plain)} features stored otherwise (split over workers, a "
                          "shared hot table, or MPE's packed codes)")
    collection = ServingCollection(source.names, list(source.embeddings),
                                   source.model_config.table_dim)
    try:
        mixed, report = quantize_collection_mixed(collection, stats, budget_bytes)
    except ValueError as exc:
        option = "--budget-bytes: " if "budget" in str(exc) else ""
        raise ExportError(f"{option}{exc}") from None
    quantised = ServingModel(source.model_config, source.dense, source.names,
                             list(mixed.embeddings.values()))
    metadata = _copy_metadata(model_dir, document, "mixed", version)
    metadata["mixed_precision"] = {"budget_bytes": budget_bytes,
                                   "rows_per_format": report.rows_per_format}
    written, error = _write_checked(source, quantised, out, metadata, "mixed")
    return _summary(out, metadata, document, written, error)


def _load_source(model_dir: Path, out: Path, quantising: bool) -> tuple[ServingModel, dict]:
    _check_paths(model_dir, out)
    try:
        source, document = load_model(model_dir)
    except ModelFileError as exc:
        raise ExportError(str(exc)) from None
    previous = document.get("quantize", "none")
    if previous not in ("none", "fp32", None) and quantising:
        raise ExportError(f"{model_dir} is already quantised ({previous}); quantise the fp32 "
                          "export instead, or errors add up")
    return source, document


def _copy_metadata(model_dir: Path, document: dict[str, Any], fmt: str,
                   version: str | None) -> dict[str, Any]:
    """The source's metadata, with what the copy is stored as and where it came from."""
    metadata = {k: v for k, v in document.items() if k not in COMPUTED_KEYS}
    metadata.update(
        quantize=document.get("quantize", "none") if fmt == "none" else fmt,
        source={"model_dir": str(model_dir.resolve()),
                "weights_sha256": document["weights_sha256"]},
    )
    if version or "version" in document:
        metadata["version"] = version or (document["version"] if fmt == "none"
                                          else f"{document['version']}-{fmt}")
    return metadata


def _summary(out: Path, metadata: dict[str, Any], document: dict[str, Any],
             written: dict[str, Any], error: float) -> dict[str, Any]:
    return {
        "out": str(out),
        "quantize": metadata["quantize"],
        "version": written.get("version"),
        "bytes_before": document["serving_bytes"]["embeddings"],
        "bytes_after": written["serving_bytes"]["embeddings"],
        "max_probability_change": error,
    }


def _check_paths(model_dir: Path, out: Path) -> None:
    _check_source(model_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new --out")
    if out.resolve() == model_dir.resolve():
        raise ExportError("--out must differ from --model-dir: the source stays untouched")


def _write_checked(source: ServingModel, quantised: ServingModel, out: Path,
                   metadata: dict[str, Any], fmt: str) -> tuple[dict[str, Any], float]:
    """Export into a staging folder beside `out`, check it, then move it into place; the
    written model.json and the largest probability change."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700); a server running as another user must
        # still read it, so give it the permissions an ordinary mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        export_model(quantised, staging, metadata)
        reloaded, written = load_model(staging)
        error = _agreement(source, reloaded)
        if fmt == "none" and error > 1e-6:
            raise ExportError(f"the copy scores differently from the source (max |Δp| {error})")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written, error
