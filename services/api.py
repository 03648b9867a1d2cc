"""The FastAPI app of the scoring API: its description, docs pages, guard and error answers.

The routes themselves are methods of the Serve deployment (`services.scoring`), which Ray
Serve binds to this app with `@serve.ingress`; what they share is kept here.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

from services.auth import BearerAuth
from services.guard import UploadGuard
from services.openapi import install_openapi
from services.schemas import ErrorItem, ErrorResponse

DOCS_ENV = "EMBPRESS_DOCS"
NO_MODEL = "no model loaded yet; see GET /readyz"

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

# The error answers the OpenAPI page lists, by status.
ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or wrong bearer token (only when the server has one)",
        413: "more rows (or bytes) than the deployment accepts",
        415: "Content-Type is not application/json",
        422: "the body is not JSON, or a row or field is invalid (named in the message)",
        503: "no model loaded yet",
    }.items()
}


def json_answer(body: BaseModel, status: int = 200,
                headers: dict[str, str] | None = None) -> Response:
    """`body` as JSON, serialised once by pydantic-core: a returned Response skips FastAPI's
    second validation and encoding of the `response_model`."""
    return Response(body.model_dump_json(), status_code=status, headers=headers,
                    media_type="application/json")


def error_answer(status: int, detail: str, errors: list[ErrorItem] | None = None,
                 headers: dict[str, str] | None = None) -> Response:
    """An `ErrorResponse`: one line for people, the list for programs."""
    return json_answer(ErrorResponse(detail=detail, errors=errors or []), status, headers)


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
install_openapi(app)
