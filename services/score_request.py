"""From a `POST /v1/score` request to validated rows, or the 4xx answer that says why not.

The cheap checks come first and, where they can, before the body is read: the declared
length, the content type; then the body (already read whole by `services.guard`), gzip, one
pydantic-core parse, duplicate keys, and the deployment's row limit.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from services.api import error_answer, json_answer
from services.bodies import BodyError, check_content_type, decode_body, refuse_duplicate_keys
from services.schemas import ErrorItem, describe_errors, parse_score_request

# Generous for the widest legal row (named fields, pretty-printed): a body this large per
# row is not a Criteo request, and the limit is checked before the body is read.
BYTES_PER_ROW = 4096


async def read_rows(request: Request, max_rows: int) -> list[dict[str, Any]] | Response:
    """The request's rows, validated; or the 413/415/422 answer naming what is wrong."""
    try:
        body = await _read_body(request, max_rows)
        parsed = parse_score_request(body)
        refuse_duplicate_keys(body, parsed.rows)
    except BodyError as exc:
        return error_answer(exc.status, exc.detail)
    except ValidationError as exc:  # from the parse: `body` is the decoded body
        return json_answer(describe_errors(exc, body), 422)
    if len(parsed.rows) > max_rows:
        return _too_many_rows(len(parsed.rows), max_rows)
    return parsed.rows


async def _read_body(request: Request, max_rows: int) -> bytes:
    """The body with its Content-Encoding undone; BodyError when too big or not JSON."""
    max_bytes = max_rows * BYTES_PER_ROW
    too_big = BodyError(413, f"body over this deployment's limit of {max_bytes:,} bytes "
                             f"({max_rows:,} rows per request)")
    headers = request.headers
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    check_content_type(headers.get("content-type"))
    # UploadGuard has read the whole body within its deadline and size limit.
    body = await request.body()
    if len(body) > max_bytes:
        raise too_big
    return decode_body(body, headers.get("content-encoding"), max_bytes)


def _too_many_rows(rows: int, max_rows: int) -> Response:
    message = (f"{rows:,} rows, more than this deployment's maximum of "
               f"{max_rows:,} per request")
    return error_answer(413, f"rows: {message}",
                        [ErrorItem(row=None, field="rows", loc="rows", msg=message,
                                   type="too_many_rows")])
