"""The scoring API's bearer token, from an environment variable or a mounted secret file.

A separate module because the app reads it twice before any replica exists (whether the
docs pages are on, whether the OpenAPI page declares the scheme) and the replica once more.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "EMBPRESS_API_TOKEN"
TOKEN_FILE_ENV = "EMBPRESS_API_TOKEN_FILE"


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
    def from_env(cls) -> BearerAuth:
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
