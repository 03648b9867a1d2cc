"""Slow and oversized uploads, answered before any scoring slot is spent on them.

A replica scores at most `max_ongoing_requests` requests at once, and Serve counts a request
from its headers on, so clients that send headers and then trickle (or never finish) their
body used to hold every slot. `UploadGuard` reads each body in full, within a deadline and a
size limit, before the wrapped app sees the request: a body that is late is answered 408, one
over the limit 413, and a client that leaves is logged as one line. Requests whose body has
not arrived at once count as *uploading*; past `max_uploading` of them, a new slow upload is
answered 503 at once, so slow uploads cannot pile up either.

Where it runs (both, by design):

* in front of Serve's HTTP proxy and of each replica's direct-ingress server, through Serve's
  `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=services.guard:serve_http_middlewares` (set before
  Ray starts; `python -m jobs.serve` does). There an upload costs a little memory and no
  replica slot at all;
* inside the FastAPI app, for clusters started without that variable: there an upload holds a
  slot until its deadline, so the cap is a quarter of the replica's slots.

This module is imported by Serve's proxy process: it imports nothing heavy (no torch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEADLINE_ENV = "EMBPRESS_BODY_DEADLINE_S"
MAX_UPLOADING_ENV = "EMBPRESS_MAX_UPLOADING"
MAX_BODY_ENV = "EMBPRESS_MAX_BODY_BYTES"
CALLBACK = "services.guard:serve_http_middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"

DEFAULT_DEADLINE_S = 5.0
# In front of the replica an upload holds only its bytes, so many may wait; the cap bounds
# memory (uploads × body limit), not scoring capacity.
DEFAULT_MAX_UPLOADING = 256
# 4,096 rows of the widest legal JSON row (services.score_request.BYTES_PER_ROW) fit.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
# A body that has not arrived within this long after the headers is "uploading". Clients that
# send headers and body in one write never wait this long, so they are never counted. Inside
# the replica, behind Serve's proxy, the body comes over an RPC from the proxy, which on a
# loaded machine took over 50 ms: there the grace is longer.
UPLOAD_GRACE_S = {"front": 0.05, "replica": 0.5}
# uvicorn settings Serve does not expose (it builds uvicorn.Config itself, in the proxy and
# in each direct-ingress replica): no `server: uvicorn` banner, bounded connections + tasks
# (uvicorn answers 503 past it), and headers bounded to 16 KiB (h11; httptools has its own).
UVICORN_DEFAULTS = {"server_header": False, "limit_concurrency": 2048,
                    "h11_max_incomplete_event_size": 16 * 1024}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


class UploadGuard:
    """ASGI middleware: whole bodies within a deadline and a size limit, or a short answer.

    Args:
        app: the wrapped ASGI app; it receives the body in one `http.request` message.
        deadline_s: seconds from the headers to the body's last byte (408 after).
        max_uploading: slow uploads allowed at once (503 past it).
        max_body_bytes: largest body (413 past it; bodies may be gzip, see the app).
        where: "front" (proxy, direct ingress) or "replica", for the log lines.
    """

    def __init__(self, app: ASGIApp, deadline_s: float | None = None,
                 max_uploading: int | None = None, max_body_bytes: int | None = None,
                 where: str = "front") -> None:
        self.app = app
        self.deadline_s = deadline_s or _env_float(DEADLINE_ENV, DEFAULT_DEADLINE_S)
        self.max_uploading = max_uploading or int(_env_float(MAX_UPLOADING_ENV,
                                                             DEFAULT_MAX_UPLOADING))
        self.max_body = max_body_bytes or int(_env_float(MAX_BODY_ENV, DEFAULT_MAX_BODY))
        self.where = where
        self.grace_s = UPLOAD_GRACE_S[where]
        self.uploading = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, 413, f"body of {int(declared):,} bytes is over the limit of "
                                     f"{self.max_body:,} bytes")
            return
        body = await self._read(scope, receive, send)
        if body is None:
            return  # answered (408/413/503) or the client left
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect comes

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        parts: list[bytes] = []
        size = 0
        counted = False
        try:
            while True:
                pending = asyncio.ensure_future(receive())
                wait = self.grace_s if not counted else deadline - loop.time()
                done, _ = await asyncio.wait({pending}, timeout=max(wait, 0))
                if not done and not counted:
                    if self.uploading >= self.max_uploading:
                        pending.cancel()
                        await _answer(send, 503, f"{self.uploading} uploads in progress, the "
                                                 "most this server takes; retry shortly",
                                      {"retry-after": "1"})
                        return None
                    counted = True
                    self.uploading += 1
                    done, _ = await asyncio.wait({pending},
                                                 timeout=max(deadline - loop.time(), 0))
                if not done:
                    pending.cancel()
                    logger.warning("%s %s: body not complete after %.1f s (%d bytes read); "
                                   "answered 408", scope.get("method"), scope.get("path"),
                                   self.deadline_s, size)
                    await _answer(send, 408, f"request body not received within "
                                             f"{self.deadline_s:g} s ({size:,} bytes arrived)")
                    return None
                message = pending.result()
                if message["type"] == "http.disconnect":
                    logger.info("%s %s: client disconnected after %d body bytes",
                                scope.get("method"), scope.get("path"), size)
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await _answer(send, 413, f"body over the limit of {self.max_body:,} bytes")
                    return None
                parts.append(chunk)
                if not message.get("more_body", False):
                    return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            if counted:
                self.uploading -= 1


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() != "0"
    return _header(scope, b"transfer-encoding") is not None


async def _answer(send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    """A JSON error like the app's; the connection closes (its body was not read)."""
    body = json.dumps({"detail": detail, "errors": []}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


def quiet_uvicorn() -> None:
    """Make UVICORN_DEFAULTS the defaults of every uvicorn.Config built in this process."""
    import uvicorn.config

    config = uvicorn.config.Config
    if getattr(config.__init__, "_embpress", False):
        return
    original = config.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        for key, value in UVICORN_DEFAULTS.items():
            kwargs.setdefault(key, value)
        original(self, *args, **kwargs)

    init._embpress = True  # type: ignore[attr-defined]
    config.__init__ = init  # type: ignore[method-assign]


def serve_http_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: runs in the proxy and in each direct-ingress replica
    before their uvicorn server is built; returns the middleware that wraps them."""
    from starlette.middleware import Middleware

    quiet_uvicorn()
    return [Middleware(UploadGuard, where="front")]
