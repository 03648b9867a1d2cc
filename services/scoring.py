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
  validated once, by pydantic-core from the raw bytes; hex decoding and the feature
  transform run over the whole request with numpy (`services.features`).
* Answers never echo unbounded input nor name a path on the server's disk.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the
# route signatures at runtime, and a string "Request" would turn into a query parameter.
import asyncio
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from ray import serve

from data_pipeline.schema import NUM_DENSE, NUM_SPARSE
from embeddings.serving import ModelFileError, ServingModel, load_model
from services.bodies import (
    BodyError,
    check_content_type,
    decode_body,
    refuse_duplicate_keys,
    shorten,
)
from services.features import model_inputs
from services.guard import UploadGuard
from services.schemas import (
    HARD_MAX_ROWS,
    REQUEST_EXAMPLES,
    ErrorItem,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    ScoreRequest,
    ScoreResponse,
    describe_errors,
    parse_score_request,
)

logger = logging.getLogger("ray.serve")

TOKEN_ENV = "EMBPRESS_API_TOKEN"
TOKEN_FILE_ENV = "EMBPRESS_API_TOKEN_FILE"
THREADS_ENV = "EMBPRESS_TORCH_THREADS"
DOCS_ENV = "EMBPRESS_DOCS"
# Rows per forward pass. Measured on dlrm-small, one thread: 3.7 µs/row at 1,024 rows
# against 7.5 at 256 and 7.2 at 8,192 (large batches fall out of cache), so a merged batch
# is scored in slices of this size.
FORWARD_ROWS = 1024
# Generous for the widest legal row (named fields, pretty-printed): a body this large per
# row is not a Criteo request, and the limit is checked before the body is read.
BYTES_PER_ROW = 4096


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
    def _batch_holds_a_request(self) -> "ScoringSettings":
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


class BearerAuth:
    """The API token, from an environment variable or a mounted (Kubernetes) secret file.

    EMBPRESS_API_TOKEN holds the token itself; EMBPRESS_API_TOKEN_FILE names a file holding
    it (a secret volume), re-read when the file changes so a rotated secret takes effect
    without a restart. Neither set: no authentication.
    """

    def __init__(self, token: str | None = None, token_file: str | None = None) -> None:
        if token and token_file:
            raise ValueError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both")
        self._token = token.encode() if token else None
        self._file = Path(token_file) if token_file else None
        self._stamp: tuple[int, int] | None = None
        if self._file is not None:
            self._reload()  # a missing secret file must stop the replica, not disable auth

    @classmethod
    def from_env(cls) -> "BearerAuth":
        return cls(os.environ.get(TOKEN_ENV) or None, os.environ.get(TOKEN_FILE_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._file is not None

    def _reload(self) -> None:
        assert self._file is not None
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                token = self._file.read_text().strip()
                if not token:
                    raise ValueError(f"{TOKEN_FILE_ENV}={self._file} is empty")
                self._token, self._stamp = token.encode(), stamp
        except OSError as exc:
            if self._token is None:
                raise ValueError(f"{TOKEN_FILE_ENV}={self._file}: {exc}") from None
            # Kubernetes swaps secret files through a symlink; a read that races the swap
            # keeps the previous token rather than opening the API.

    def allows(self, authorization: str | None) -> bool:
        if not self.enabled:
            return True
        if self._file is not None:
            self._reload()
        scheme, _, given = (authorization or "").partition(" ")
        assert self._token is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self._token)


def _error(status: int, detail: str, errors: list[ErrorItem] | None = None,
           headers: dict[str, str] | None = None) -> Response:
    body = ErrorResponse(detail=detail, errors=errors or [])
    return Response(body.model_dump_json(), status_code=status, headers=headers,
                    media_type="application/json")


# What a client may see of model.json: the model's shape and quality, never where it was
# trained or stored (the training config holds data and run paths).
PUBLIC_MODEL_KEYS = ("format", "schema_version", "version", "features", "num_dense",
                     "embedding_dim", "model", "serving_bytes", "metrics", "quantize",
                     "weights_sha256")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:\\|/)[^\s'\"():,]+")


def without_paths(text: str) -> str:
    """A message with every absolute path replaced (answers must not map the server's disk)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return without_paths(value) if isinstance(value, str) else value


def public_model(document: dict[str, Any]) -> dict[str, Any]:
    """model.json as clients see it: features, dims, methods, bytes, metrics; no paths."""
    shown = {k: document[k] for k in PUBLIC_MODEL_KEYS if k in document}
    shown["methods"] = sorted({_method(e) for e in document.get("embeddings", {}).values()})
    return _public(shown)


def _method(embedding: dict[str, Any]) -> str:
    """A feature's serving form in a word: its mapper kind(s) and table formats."""
    parts = embedding.get("parts") or [embedding]
    kinds = sorted({str(p.get("mapper", {}).get("kind", "?")) for p in parts})
    formats = sorted({str(t.get("fmt", "fp32")) for p in parts for t in p.get("tables", [])})
    return "+".join(kinds) + (f" ({'/'.join(formats)})" if formats else "")


class ModelInfo(BaseModel):
    """What this replica serves: its version, settings and the model's public description."""

    version: str
    loaded_at: float = Field(description="Unix time the model was loaded")
    replica: str = Field(description="the Serve replica that answered (changes only when "
                         "a replica is replaced, not when its model is swapped)")
    reload_error: str | None = Field(
        description="why the latest model change was refused (this model kept serving); "
                    "the full reason is in the replica's log")
    settings: dict[str, Any] = Field(description="batching and size limits")
    model: dict[str, Any] = Field(description="features, dimensions, methods, serving bytes, "
                                  "metrics, version (from model.json, without paths)")


DESCRIPTION = """\
Click-through-rate scores from an embpress model (compressed embeddings collapsed to one
table per feature).

`POST /v1/score` takes a batch of Criteo rows — 13 integer features (I1..I13, int32 or
null) and 26 categorical features (C1..C26, up to 8 hex digits, or null) — either as two
arrays per row or as named fields, and returns one click probability per row with the
model version that computed it. Every 4xx answer names the row and the field at fault.

When the server has a token configured, `/v1/score` and `/v1/model` need
`Authorization: Bearer <token>`; `/healthz` and `/readyz` never do.
"""

def _docs_enabled() -> bool:
    """EMBPRESS_DOCS=on/off; by default off when a token is set (the pages load their
    scripts from a public CDN, and an open page maps the API for anyone)."""
    choice = os.environ.get(DOCS_ENV, "").strip().lower()
    if choice in ("on", "1", "true"):
        return True
    if choice in ("off", "0", "false"):
        return False
    return not BearerAuth.from_env().enabled


_DOCS = _docs_enabled()
app = FastAPI(title="embpress scoring", version="1", description=DESCRIPTION,
              docs_url="/docs" if _DOCS else None, redoc_url="/redoc" if _DOCS else None)
# Inside the replica too, for clusters started without the proxy callback
# (services.guard): here an upload holds a scoring slot, so at most a quarter of them.
app.add_middleware(UploadGuard, max_uploading=16, where="replica")

_SECURED = [{"bearer": []}]
_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or wrong bearer token (only when the server has one)",
        413: "more rows (or bytes) than the deployment accepts",
        415: "Content-Type is not application/json",
        422: "the body is not JSON, or a row or field is invalid (named in the message)",
        503: "no model loaded yet",
    }.items()
}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema, plus the request body that the handler parses itself."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    request = TypeAdapter(ScoreRequest).json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(request.pop("$defs", {}))
    schemas["ScoreRequest"] = request
    if BearerAuth.from_env().enabled:
        # Declared only when the routes do ask for it: without a token they answer anyone.
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/score", "/v1/model"):
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = _SECURED
    app.openapi_schema = schema
    return schema


app.openapi = _openapi  # type: ignore[method-assign]


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


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
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
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # built outside Serve
            self.replica = f"pid-{os.getpid()}"
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
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                      headers={"WWW-Authenticate": "Bearer"})

    # Sized in rows (batch_size_fn), reset from user_config. Serve's warning that
    # max_batch_size exceeds max_ongoing_requests counts requests, so it does not apply.
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

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        summary="Click probabilities for a batch of rows",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ScoreRequest"},
                    "examples": REQUEST_EXAMPLES}},
            },
        },
    )
    async def score(self, request: Request) -> Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        settings = self.settings
        if self.loaded is None or settings is None:
            return _error(503, "no model loaded yet; see GET /readyz")
        max_bytes = settings.max_rows_per_request * BYTES_PER_ROW
        too_big = _error(413, f"body over this deployment's limit of {max_bytes:,} bytes "
                              f"({settings.max_rows_per_request:,} rows per request)")
        headers = request.headers
        declared = headers.get("content-length", "")
        encoding = headers.get("content-encoding")
        if declared.isdigit() and int(declared) > max_bytes:
            return too_big
        try:
            check_content_type(headers.get("content-type"))
            # UploadGuard has read the whole body within its deadline and size limit.
            body = await request.body()
            if len(body) > max_bytes:
                return too_big
            body = decode_body(body, encoding, max_bytes)
            parsed = parse_score_request(body)
            refuse_duplicate_keys(body, parsed.rows)
        except BodyError as exc:
            return _error(exc.status, exc.detail)
        except ValidationError as exc:
            described = describe_errors(exc, body)
            return Response(described.model_dump_json(), status_code=422,
                            media_type="application/json")
        rows = parsed.rows
        if len(rows) > settings.max_rows_per_request:
            message = (f"{len(rows):,} rows, more than this deployment's maximum of "
                       f"{settings.max_rows_per_request:,} per request")
            return _error(413, f"rows: {message}",
                          [ErrorItem(row=None, field="rows", loc="rows", msg=message,
                                     type="too_many_rows")])
        dense, sparse = model_inputs(rows)
        try:
            probabilities, version = await self._score_batch((dense, sparse))
        except Exception as exc:  # a model failure is the server's fault, never the row's
            logger.exception("scoring failed")
            return _error(500, f"scoring failed: {type(exc).__name__}: "
                               f"{shorten(without_paths(str(exc)))}")
        answer = ScoreResponse.model_construct(version=version,
                                               probabilities=probabilities.tolist())
        return Response(answer.model_dump_json(), media_type="application/json")

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

    @app.get("/v1/model", response_model=ModelInfo, responses={401: _ERRORS[401],
                                                                 503: _ERRORS[503]},
             summary="The served model's version, settings and description")
    async def model_info(self, request: Request) -> Response:
        if (denied := self._unauthorised(request)) is not None:
            return denied
        loaded, settings = self.loaded, self.settings
        if loaded is None or settings is None:
            return _error(503, "no model loaded yet; see GET /readyz")
        info = ModelInfo(version=loaded.version, loaded_at=loaded.loaded_at,
                         replica=self.replica, reload_error=self.reload_error,
                         settings=settings.model_dump(exclude={"model_dir"}),
                         model=public_model(loaded.document))
        return Response(info.model_dump_json(), media_type="application/json")


__all__ = [
    "BearerAuth",
    "LoadedModel",
    "ScoringDeployment",
    "ScoringSettings",
    "app",
    "load_for_serving",
]
