"""Raw Criteo bytes as whole lines, for pyarrow's streaming CSV reader: gzip undone (keeping
every byte decoded before a cut), non-ASCII masked, overlong lines capped.

The byte plumbing under `data_pipeline.criteo`, which decides what each line means.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import BinaryIO

# 1 MiB blocks were the fastest here (larger blocks fall out of cache; see convert_speed.py).
DEFAULT_BLOCK_SIZE = 1 << 20
# A line longer than this is junk (Criteo lines are ~250 bytes); capping it keeps memory bounded
# on newline-free input and keeps every block made of whole lines.
MAX_LINE_BYTES = 1 << 16
LONG_LINE_MARKER = b"<line longer than 65536 bytes: content omitted>"

# Non-ASCII bytes can never be part of a valid field, but pyarrow fails the whole read when it
# hands a wrong-width line with invalid UTF-8 to the invalid-row handler; mapping them to "?"
# keeps every accept/reject decision and every line boundary unchanged.
_ASCII_ONLY = bytes(range(128)) + b"?" * 128


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _Gunzip:
    """gzip decoding that hands out every byte it can decode before a cut.

    pyarrow's and Python's gzip readers both drop the output of the read that meets the end of
    a truncated stream (up to a whole block of good lines); zlib itself does not.
    """

    _CHUNK = 1 << 18

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""

    def read(self, n: int) -> bytes:
        while True:
            if self._z.eof:  # end of one member: another may follow (concatenated .gz files)
                rest = self._z.unused_data or self._raw.read(self._CHUNK)
                if not rest.strip(b"\0"):  # trailing zero padding is allowed after a member
                    return b""
                self._z = zlib.decompressobj(wbits=31)
                self._pending = rest
            data = self._pending or self._raw.read(self._CHUNK)
            if not data:
                raise EOFError("gzip stream ends early")
            out = self._z.decompress(data, n)
            self._pending = self._z.unconsumed_tail
            if out:
                return out

    def close(self) -> None:
        self._raw.close()


class LineStream:
    """Raw input as whole lines: gzip undone, non-ASCII masked, long lines capped, cuts caught.

    pyarrow reads it through `read(n)`; every chunk returned ends at a line end (except the
    file's last line), so a gzip stream that breaks mid-line loses only that partial line.
    """

    def __init__(self, path: str | Path):
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._src: BinaryIO | _Gunzip = _Gunzip(self._raw) if is_gzip(path) else self._raw
        self._tail = b""
        self._skipping = False
        self._eof = False
        self.truncated: str | None = None
        self.dropped_bytes = 0
        self.delivered = 0
        self.closed = False

    @property
    def raw_position(self) -> int:
        """Bytes of the file on disk consumed so far (compressed bytes for gzip)."""
        return self._raw.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self.closed = True

    def _read_source(self, n: int) -> bytes:
        try:
            return self._src.read(n)
        except EOFError:
            self.truncated = "gzip stream ends early (truncated file)"
        except zlib.error as exc:
            self.truncated = f"gzip stream is corrupt ({exc})"
        return b""

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = DEFAULT_BLOCK_SIZE
        while True:
            if self._eof:
                out, self._tail = self._tail, b""
                self.delivered += len(out)
                return out
            chunk = self._read_source(max(n - len(self._tail), 1))
            if not chunk:
                self._eof = True
                if self.truncated is not None:
                    self.dropped_bytes = len(self._tail)
                    self._tail = b""
                continue
            if not chunk.isascii():
                chunk = chunk.translate(_ASCII_ONLY)
            if self._skipping:
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                chunk = chunk[nl:]
                self._skipping = False
            cut = chunk.rfind(b"\n")
            if cut < 0:
                self._tail += chunk
                self._cap_tail()
                continue
            out = self._tail + chunk[: cut + 1]
            self._tail = chunk[cut + 1 :]
            self._cap_tail()
            self.delivered += len(out)
            return out

    def _cap_tail(self) -> None:
        if len(self._tail) > MAX_LINE_BYTES:
            self._tail = LONG_LINE_MARKER
            self._skipping = True
