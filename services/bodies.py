"""Request bodies before validation: content negotiation, gzip, and duplicate JSON keys.

pydantic-core parses JSON with the last of duplicate keys winning, which would let
`{"rows": [<junk>], "rows": [<good>]}` through; `refuse_duplicate_keys` finds them. It
costs a few byte counts on the common body (array rows: each key appears once per row, so
matching counts prove there is no duplicate) and one Python parse otherwise.
"""

from __future__ import annotations

import email.message
import json
import re
import zlib
from typing import Any

UTF8 = ("utf-8", "utf8")


class BodyError(ValueError):
    """A body the service will not parse; `status` is the HTTP answer (413, 415, 422)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def clip(text: str, keep: int = 32) -> str:
    """`text` for an error message: whole when short, else a prefix and its length."""
    if len(text) <= keep:
        return repr(text)
    return f"{text[:keep]!r}… ({len(text):,} characters)"


def shorten(text: str, keep: int = 200) -> str:
    """`text` whole when short, else its first `keep` characters and its length."""
    if len(text) <= keep:
        return text
    return f"{text[:keep]}… ({len(text):,} characters)"


def check_content_type(content_type: str | None) -> None:
    """JSON in UTF-8 (RFC 8259), or BodyError 415."""
    if content_type == "application/json":  # nearly every request: skip the parsing below
        return
    if not content_type:
        raise BodyError(415, "Content-Type must be application/json, got none")
    message = email.message.Message()
    message["content-type"] = content_type
    kind = message.get_content_type()
    if not (kind == "application/json"
            or (kind.startswith("application/") and kind.endswith("+json"))):
        raise BodyError(415, f"Content-Type must be application/json, got {clip(content_type)}")
    charset = message.get_param("charset")
    if isinstance(charset, str) and charset.lower() not in UTF8:
        raise BodyError(415, f"charset {clip(charset)} is not accepted: send JSON in UTF-8")


def decode_body(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body with its Content-Encoding undone (gzip, or none), at most `max_bytes`."""
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding != "gzip":
        raise BodyError(415, f"Content-Encoding {clip(encoding or '')} is not accepted "
                             "(gzip or none)")
    # Inflate no more than the limit allows: a small bomb must not become gigabytes here.
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BodyError(422, f"body: not valid gzip ({exc})") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise BodyError(413, f"gzip body inflates past this deployment's limit of "
                             f"{max_bytes:,} bytes")
    if not inflater.eof:
        raise BodyError(422, "body: gzip stream is truncated")
    return out


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(422, f"body: duplicate key {clip(key)} in a JSON object "
                                     "(each key may appear once)")
            seen.add(key)
    return out


def refuse_duplicate_keys(body: bytes, rows: list[dict[str, Any]]) -> None:
    """BodyError 422 naming the key when a JSON object of a valid body repeats a key."""
    n = len(rows)
    if (body.count(b'"rows"') == 1 and body.count(b'"dense"') == n
            and body.count(b'"categorical"') == n and all("dense" in r for r in rows)):
        return  # every row has both keys, and each appears exactly once per row
    json.loads(body, object_pairs_hook=_unique)


_ESCAPE = re.compile(rb"\\u[0-9a-fA-F]{0,4}|\\.?")


def name_bad_escape(body: bytes, column: int) -> str | None:
    """The escape sequence a JSON error at `column` (1-based, one-line body) points at."""
    found = None
    for match in _ESCAPE.finditer(body, max(0, column - 16), column + 6):
        if match.start() >= column:
            break
        found = match.group().decode("latin-1")
    return found
