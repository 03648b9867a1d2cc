"""The Ray Serve deployment that scores Criteo rows with an exported embpress model.

Why it is shaped this way:

* The model comes in through `user_config` (`reconfigure`), never the constructor, so
  `serve deploy` of a new model directory swaps the model inside the running replica: no new
  process, no new port, no dropped request. The new model is loaded and warmed up beside the
  old one and replaces it in one assignment; every answer names the version that made it.
  (`serve.run` from Python gives every deploy a new code version, so there Serve replaces
  the replicas instead, one by one; measured here, that too dropped no request.)
* A broken new directory (missing, truncated, failing its checksum, unloadable) never takes
  the served model down. Measured on Ray Serve 2.60: when `reconfigure` raises during an
  update, Serve stops that very replica and, with one replica, answers 503 to everything until
  the next good deploy. So `reconfigure` raises only while the replica has no model yet (the
  deployment then refuses to start, with the message); afterwards it keeps the old model,
  logs the refusal and reports it, without the server's paths, in GET /v1/model.
  `services.app.build_app` checks a directory before anything is deployed, which is where a
  deploy is refused loudly.
* Rows of concurrent requests are scored together by `@serve.batch`, sized in rows; with no
  batch wait by default, requests that arrive while a batch runs form the next one, so a lone
  request never waits for company.
* The body arrives whole (`services.guard` reads it within a deadline before a scoring slot
  is spent), gzip undone and duplicate keys refused (`services.bodies`); it is parsed and
  validated once, by pydantic-core from the raw bytes (`services.score_request`); hex
  decoding and the feature transform run over the whole request with numpy
  (`services.features`).
* Answers never echo unbounded input nor name a path on the server's disk
  (`services.redaction`).
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the
# route signatures at runtime, and a string "Request" would turn into a query parameter.
import asyncio
import logging
import os
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from embeddings.serving import ModelFileError
from services.api import ERROR_RESPONSES, NO_MODEL, app, error_answer, json_answer
from services.auth import BearerAuth
from services.bodies import shorten
from services.features import model_inputs
from services.openapi import SCORE_REQUEST_BODY
from services.redaction import public_model, without_paths
from services.schemas import HealthResponse, ModelInfo, ReadyResponse, ScoreResponse
from services.score_request import read_rows
from services.served_model import LoadedModel, ScoringSettings, load_for_serving

logger = logging.getLogger("ray.serve")


class _RowBatchWarning(logging.Filter):
    """Drops Serve's warning that max_batch_size × max_concurrent_batches exceeds
    max_ongoing_requests: it counts requests, while this replica's batches are sized in rows
    (`batch_size_fn`), so it would tell every operator to raise a limit that is right."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will never achieve the configured `max_batch_size`" not in record.getMessage()


logger.addFilter(_RowBatchWarning())  # once per process: the replica imports this module

THREADS_ENV = "EMBPRESS_TORCH_THREADS"
# Rows per forward pass. Measured on dlrm-small, one thread: 3.7 µs/row at 1,024 rows
# against 7.5 at 256 and 7.2 at 8,192 (large batches fall out of cache), so a merged batch
# is scored in slices of this size.
FORWARD_ROWS = 1024
# CPUs each replica reserves (`jobs.serve` checks that the cluster can place them all).
REPLICA_CPUS = 1


def _rows_in(items: list[tuple[np.ndarray, np.ndarray]]) -> int:
    return sum(len(dense) for dense, _ in items)


def _torch_threads() -> int:
    """Threads for torch: EMBPRESS_TORCH_THREADS, else the CPUs Ray gave this replica.

    More threads than reserved CPUs fight the proxy and the other replicas for cores; on
    the shared 2-core test machine, with other jobs running, two threads made a 256-row
    forward ~40× slower than one.
    """
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # outside a Ray worker (tests that build the class directly)
        cpus = 1.0
    return max(1, int(cpus))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside Serve
        return f"pid-{os.getpid()}"


@serve.deployment(
    ray_actor_options={"num_cpus": REPLICA_CPUS},
    # Enough in flight per replica for @serve.batch to have rows to merge at concurrency 32.
    max_ongoing_requests=64,
    # Serve's per-request access log is formatted and written to two handlers on the
    # replica's own core, a measurable share of a small request's CPU time; errors are
    # still logged. Turn it back on with `logging_config: {enable_access_log: true}`.
    logging_config={"enable_access_log": False},
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    },
    health_check_period_s=10,
)
@serve.ingress(app)
class ScoringDeployment:
    """Scores Criteo rows; the model arrives through `reconfigure(user_config)`."""

    def __init__(self) -> None:
        # Fails the replica at start when the token file is configured but unreadable.
        self.auth = BearerAuth.from_env()
        threads = _torch_threads()
        torch.set_num_threads(threads)
        self.loaded: LoadedModel | None = None
        self.settings: ScoringSettings | None = None
        self.reload_error: str | None = None
        self._reconfiguring = asyncio.Lock()
        self.replica = _replica_id()
        logger.info("scoring replica: %d torch thread(s), auth %s", threads,
                    "on" if self.auth.enabled else "off")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model `user_config` names; keep the current one if that fails."""
        async with self._reconfiguring:
            try:
                settings = ScoringSettings.model_validate(user_config)
                loaded = await asyncio.to_thread(load_for_serving, settings)
            except Exception as exc:  # whatever stops a model loading refuses the change
                reason = f"model change refused: {type(exc).__name__}: {exc}"
                if self.loaded is None:
                    # Nothing to keep serving: fail the replica so the deploy fails, with this.
                    raise ModelFileError(reason) from exc
                logger.error("%s (still serving version %s)", reason, self.loaded.version)
                self.reload_error = (f"{shorten(without_paths(reason), 300)} (still serving "
                                     f"version {self.loaded.version})")
                return
            self._score_batch.set_max_batch_size(settings.max_batch_rows)
            self._score_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
            self.settings, self.loaded, self.reload_error = settings, loaded, None
            logger.info("serving model version %s from %s", loaded.version, loaded.model_dir)

    def check_health(self) -> None:
        """Serve's liveness probe: healthy even without a model (/readyz tells that)."""

    def _unauthorised(self, request: Request) -> Response | None:
        if self.auth.allows(request.headers.get("authorization")):
            return None
        return error_answer(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})

    # Sized in rows (batch_size_fn), reset from user_config. Serve's warning that
    # max_batch_size exceeds max_ongoing_requests counts requests, so it does not apply
    # (`_RowBatchWarning` drops it).
    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.0, batch_size_fn=_rows_in)
    async def _score_batch(
        self, items: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, str]]:
        loaded = self.loaded  # one model for the whole batch, even if a swap lands now
        assert loaded is not None
        dense = np.concatenate([d for d, _ in items]) if len(items) > 1 else items[0][0]
        sparse = np.concatenate([s for _, s in items]) if len(items) > 1 else items[0][1]
        with torch.inference_mode():
            d, s = torch.from_numpy(dense), torch.from_numpy(sparse)
            logits = torch.cat([loaded.model(d[i:i + FORWARD_ROWS], s[i:i + FORWARD_ROWS])
                                for i in range(0, len(d), FORWARD_ROWS)])
            probabilities = torch.sigmoid(logits).numpy()
        out, start = [], 0
        for d, _ in items:
            out.append((probabilities[start:start + len(d)], loaded.version))
            start += len(d)
        return out

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              summary="Click probabilities for a batch of rows",
              openapi_extra=SCORE_REQUEST_BODY)
    async def score(self, request: Request) -> Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        settings = self.settings
        if self.loaded is None or settings is None:
            return error_answer(503, NO_MODEL)
        rows = await read_rows(request, settings.max_rows_per_request)
        if isinstance(rows, Response):
            return rows
        try:
            probabilities, version = await self._score_batch(model_inputs(rows))
        except Exception as exc:  # a model failure is the server's fault, never the row's
            logger.exception("scoring failed")
            return error_answer(500, f"scoring failed: {type(exc).__name__}: "
                                     f"{shorten(without_paths(str(exc)))}")
        return json_answer(ScoreResponse.model_construct(version=version,
                                                         probabilities=probabilities.tolist()))

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness: the server runs")
    async def healthz(self) -> HealthResponse:
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, summary="Readiness: a model is loaded",
             responses={503: {"model": ReadyResponse, "description": "no model loaded yet"}})
    async def readyz(self) -> Response:
        loaded = self.loaded
        body = ReadyResponse(ready=loaded is not None,
                             version=loaded.version if loaded else None)
        return JSONResponse(body.model_dump(), status_code=200 if loaded else 503)

    @app.get("/v1/model", response_model=ModelInfo,
             responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]},
             summary="The served model's version, settings and description")
    async def model_info(self, request: Request) -> Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        loaded, settings = self.loaded, self.settings
        if loaded is None or settings is None:
            return error_answer(503, NO_MODEL)
        return json_answer(ModelInfo(
            version=loaded.version, loaded_at=loaded.loaded_at, replica=self.replica,
            reload_error=self.reload_error,
            settings=settings.model_dump(exclude={"model_dir"}),
            model=public_model(loaded.document)))
