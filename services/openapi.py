"""The scoring API's OpenAPI page, completed with what FastAPI cannot see for itself.

`POST /v1/score` parses its body from raw bytes (one pydantic-core pass), so FastAPI knows no
request model for it: the route points at `ScoreRequest` (`SCORE_REQUEST_BODY`) and the
schema gains it here, with the bearer scheme where the server has a token.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from services.auth import BearerAuth
from services.schemas import REQUEST_EXAMPLES, ScoreRequest

# The routes that answer 401 without the token.
SECURED_PATHS = ("/v1/score", "/v1/model")
_SECURED = [{"bearer": []}]

SCORE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ScoreRequest"},
            "examples": REQUEST_EXAMPLES}},
    },
}


def scoring_openapi(app: FastAPI) -> dict[str, Any]:
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
        for path in SECURED_PATHS:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = _SECURED
    app.openapi_schema = schema
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `scoring_openapi` as the app's /openapi.json."""
    app.openapi = partial(scoring_openapi, app)  # type: ignore[method-assign]
