"""What a replica serves: its settings (the deployment's `user_config`) and the loaded model.

Loading lives apart from the deployment so `python -m jobs.serve --check` can load and warm
a model exactly as a replica would, without Ray Serve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.schema import NUM_DENSE, NUM_SPARSE
from embeddings.serving import ModelFileError, ServingModel, load_model
from services.schemas import HARD_MAX_ROWS


class ScoringSettings(BaseModel):
    """The deployment's `user_config`: which model to serve and how to batch.

    Args:
        model_dir: an exported model directory (model.json + weights.safetensors), as seen
            from the replica's machine.
        version: the version answers carry; default: model.json's "version" if it has one,
            else the first 12 hex digits of the weights' sha256.
        max_rows_per_request: a larger request gets 413.
        max_batch_rows: most rows one forward pass scores (rows of concurrent requests
            are merged up to this).
        batch_wait_timeout_s: how long a batch waits for more requests once it has one;
            0 scores at once and lets requests that arrive meanwhile form the next batch.
    """

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(min_length=1)
    version: str | None = Field(None, min_length=1, max_length=128)
    max_rows_per_request: int = Field(4096, ge=1, le=HARD_MAX_ROWS)
    max_batch_rows: int = Field(8192, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _batch_holds_a_request(self) -> ScoringSettings:
        if self.max_batch_rows < self.max_rows_per_request:
            raise ValueError(
                f"max_batch_rows ({self.max_batch_rows}) must be at least "
                f"max_rows_per_request ({self.max_rows_per_request}): one request is "
                "scored in one batch"
            )
        return self


@dataclass
class LoadedModel:
    """A model ready to score, with what identifies it."""

    model: ServingModel
    version: str
    model_dir: str
    document: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)


def _check_model_shape(model: ServingModel, model_dir: str) -> None:
    config = model.model_config
    if config.num_dense != NUM_DENSE or len(model.names) != NUM_SPARSE:
        raise ModelFileError(
            f"{model_dir}: model takes {config.num_dense} dense and {len(model.names)} "
            f"categorical features; this API serves Criteo rows ({NUM_DENSE} and {NUM_SPARSE})"
        )


def load_for_serving(settings: ScoringSettings) -> LoadedModel:
    """Load, check and warm up a model (blocking: the caller runs it off the event loop)."""
    model, document = load_model(settings.model_dir)
    _check_model_shape(model, settings.model_dir)
    model.eval()
    # The first forward of a fresh model pays one-off allocation costs; pay them here, not
    # on a user's request, and prove the model runs before it replaces a working one.
    with torch.inference_mode():
        for n in (1, 64):
            model(torch.zeros(n, NUM_DENSE), torch.zeros(n, NUM_SPARSE, dtype=torch.int64))
    version = (settings.version or document.get("version")
               or str(document.get("weights_sha256", ""))[:12] or "unversioned")
    return LoadedModel(model, str(version), settings.model_dir, document)
