"""Streaming reader for Criteo click-log TSV (Kaggle `train.txt`, Terabyte `day_N`, plain or gzip).

Criteo files are tens of GB, so they are read in blocks with pyarrow's streaming CSV reader and
validated with vectorised array operations, never line by line in Python. Bad lines are part of
real data: each one becomes a `Reject` (file, line number, reason, raw text) and every good line
of the file is still converted into the shard schema of `data_pipeline.schema`.

What counts as what, exactly:

* A line has 40 tab-separated fields (label, I1..I13, C1..C26) or, for unlabelled scoring files
  such as Kaggle's `test.txt`, 39. The layout is detected from the first 64 KiB (the most common
  of the two widths) unless the caller fixes it.
* Rejected: another number of fields (a 1-field line, an extra trailing tab), an integer field
  that is not ``-?[0-9]+`` within int32, a categorical that is not 1–8 hex digits, a label that
  is not ``0`` or ``1`` (or is missing), any byte outside ASCII (replaced by ``?`` in the raw
  text of the reject), and a line longer than 64 KiB (its raw text is replaced by a marker;
  a valid line is under 500 bytes).
* Skipped and counted as ``blank_lines``, not rejected: blank lines, and lines whose every field
  is empty (pyarrow cannot tell the two apart; neither carries any data).
* ``\\n``, ``\\r\\n`` and a lone ``\\r`` all end a line, as in pyarrow's parser; line numbers
  count lines that way, starting at 1.
* Not Criteo at all: no line of the first 64 KiB has 39 or 40 fields, or none of the first
  1,000 non-blank lines (or of the whole file, if shorter) is a valid row → `NotCriteoError`
  naming the file, before any output is written.
* Empty file, or only blank lines: zero rows and a `CriteoInputWarning`.
* A gzip stream that ends early or is corrupt: the rows before the cut are kept, the partial
  line at the cut is dropped, and the truncation is reported in `ReadStats.truncated` and as a
  warning.
"""

from __future__ import annotations

import binascii
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from data_pipeline.line_stream import (
    DEFAULT_BLOCK_SIZE,
    LONG_LINE_MARKER,
    MAX_LINE_BYTES,
    LineStream,
)
from data_pipeline.schema import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS, arrow_schema

FIELDS_LABELLED = 1 + len(DENSE_COLUMNS) + len(SPARSE_COLUMNS)
FIELDS_UNLABELLED = FIELDS_LABELLED - 1
SNIFF_BYTES = 1 << 16
FAIL_FAST_LINES = 1000
_LONG_LINE_REASON = "line longer than 65536 bytes"
_MARKER_TEXT = LONG_LINE_MARKER.decode()
_PROGRESS_EVERY = 8 << 20
_INT_BYTES = np.zeros(256, dtype=bool)
_INT_BYTES[list(b"0123456789-")] = True
_HEX_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_NIBBLE[_c] = 10 + _i
_HEX_SHIFTS = np.arange(28, -1, -4, dtype=np.int64)
_INT_PATTERN = r"^-?0*[0-9]{1,10}$"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class NotCriteoError(ValueError):
    """The file is not Criteo TSV at all; the message names the file and what was seen."""

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"{path}: not a Criteo TSV file: {detail}")
        self.path = str(path)
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the two-argument constructor working when Ray ships the error to the driver.
        return (NotCriteoError, (self.path, self.detail))


class CriteoInputWarning(UserWarning):
    """Input that converts, but not as a user would expect: empty, blank or truncated."""


@dataclass(frozen=True)
class Reject:
    """One rejected line: where it is, why, and its raw text (without the line end)."""

    file: str
    line: int
    reason: str
    raw: str

    def to_json(self) -> str:
        return json.dumps(
            {"file": self.file, "line": self.line, "reason": self.reason, "raw": self.raw}
        )


@dataclass
class ReadStats:
    """Counts of one file's read; final once iteration ends.

    Args:
        rows, positives: rows read into the schema, and those labelled 1.
        rejects, blank_lines: lines rejected, and blank (or all-empty) lines skipped.
        lines: every line parsed, of each kind (up to a truncation's cut).
        truncated: why the gzip stream ended early, or None.
        warnings: what was also issued as `CriteoInputWarning` (empty, blank, truncated).
    """

    rows: int = 0
    positives: int = 0
    rejects: int = 0
    blank_lines: int = 0
    lines: int = 0
    truncated: str | None = None
    warnings: list[str] = field(default_factory=list)


def column_names(labelled: bool) -> list[str]:
    return ([LABEL] if labelled else []) + list(DENSE_COLUMNS) + list(SPARSE_COLUMNS)


def sniff_layout(path: str | Path, labelled: bool | None = None) -> bool | None:
    """Whether the file has a label column, from its first 64 KiB; None when it has no lines.

    Raises `NotCriteoError` when no sampled line has the expected width (39 or 40 fields, or
    the one `labelled` asks for).
    """
    stream = LineStream(path)
    try:
        head = stream.read(SNIFF_BYTES)
    finally:
        stream.close()
    lines = [ln for ln in head.replace(b"\r", b"\n").split(b"\n") if ln]
    if not lines:
        return labelled
    widths = [ln.count(b"\t") + 1 for ln in lines]
    n40, n39 = widths.count(FIELDS_LABELLED), widths.count(FIELDS_UNLABELLED)
    wanted = {True: n40, False: n39, None: n40 + n39}[labelled]
    if wanted == 0:
        seen = sorted(set(widths))[:5]
        expect = {True: "40", False: "39", None: "39 or 40"}[labelled]
        raise NotCriteoError(
            path,
            f"none of its first {len(lines)} lines has {expect} tab-separated fields "
            f"(field counts seen: {', '.join(map(str, seen))})",
        )
    return labelled if labelled is not None else n40 >= n39


def _offsets(arr: pa.Array) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1,
                         offset=arr.offset * 4)


def _data(arr: pa.Array, offsets: np.ndarray) -> np.ndarray:
    buf = arr.buffers()[2]
    if buf is None or offsets[-1] == offsets[0]:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)[offsets[0] : offsets[-1]]


def _parse_label(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """int8 labels, and the rows whose label is not 0/1 (None when every row is fine)."""
    offsets = _offsets(arr)
    data = _data(arr, offsets)
    if arr.null_count == 0 and len(data) == len(arr) and ((data == 48) | (data == 49)).all():
        return (data - 48).astype(np.int8), None
    first = np.zeros(len(arr), dtype=np.uint8)
    single = np.diff(offsets) == 1
    if single.any():
        first[single] = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[:-1][single]]
    ok = single & ((first == 48) | (first == 49))
    return np.where(ok, first - 48, 0).astype(np.int8), ~ok


def _parse_dense(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """int32 values (empty → null) and the rows that are not integers in int32."""
    offsets = _offsets(arr)
    if _INT_BYTES[_data(arr, offsets)].all():
        try:
            return pc.cast(arr, pa.int32()), None
        except pa.ArrowInvalid:
            pass  # "1-2", "-" or an out-of-range value: sort them out row by row below
    ok = pc.fill_null(pc.match_substring_regex(arr, _INT_PATTERN), True)
    wide = pc.cast(pc.if_else(ok, arr, pa.scalar(None, pa.binary())), pa.int64())
    ok = pc.and_(ok, pc.fill_null(pc.and_(pc.greater_equal(wide, _INT32_MIN),
                                          pc.less_equal(wide, _INT32_MAX)), True))
    bad = ~ok.to_numpy(zero_copy_only=False)
    values = pc.cast(pc.if_else(ok, wide, pa.scalar(None, pa.int64())), pa.int32())
    return values, (bad if bad.any() else None)


def _parse_sparse(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """int64 values of the hex strings (empty → null) and the rows that are not 1–8 hex digits."""
    offsets = _offsets(arr)
    lengths = np.diff(offsets)
    present = lengths != 0
    data = _data(arr, offsets)
    if ((lengths == 8) | ~present).all():
        try:
            packed = binascii.unhexlify(data)
        except binascii.Error:
            packed = None  # some value is not hex: sort them out row by row below
        if packed is not None:
            found = np.frombuffer(packed, dtype=">u4").astype(np.int64)
            if present.all():
                return pa.array(found), None
            values = np.zeros(len(arr), dtype=np.int64)
            values[present] = found
            return pa.array(values, mask=~present), None
    # Right-align every value of 1..8 characters into an 8-wide grid padded with "0", so one
    # table lookup validates and decodes all of them at once.
    short = present & (lengths <= 8)
    starts = offsets[:-1][short] - offsets[0]
    pad = (8 - lengths[short])[:, None]
    cols = np.arange(8)[None, :]
    where = np.clip(starts[:, None] + cols - pad, 0, max(len(data) - 1, 0))
    grid = np.where(cols < pad, ord("0"), data[where] if len(data) else ord("0"))
    nibbles = _HEX_NIBBLE[grid]
    hex_ok = (nibbles != 255).all(axis=1)
    decoded = (nibbles.astype(np.int64) << _HEX_SHIFTS).sum(axis=1)
    ok = ~present
    ok[np.flatnonzero(short)[hex_ok]] = True
    values = np.zeros(len(arr), dtype=np.int64)
    values[short] = np.where(hex_ok, decoded, 0)
    bad = ~ok
    return pa.array(values, mask=~present | bad), (bad if bad.any() else None)


def _why(name: str, value: bytes | None) -> str:
    shown = "" if value is None else value.decode("ascii", "replace")
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    if name == LABEL:
        return "label: missing" if not shown else f"label: not 0 or 1: {shown!r}"
    if name.startswith("I"):
        return f"{name}: not an integer in int32: {shown!r}"
    if value is not None and len(value) > 8 and all(c in b"0123456789abcdefABCDEF" for c in value):
        return f"{name}: more than 8 hex digits: {shown!r}"
    return f"{name}: not a hex categorical: {shown!r}"


class CriteoReader:
    """Iterate one Criteo TSV file as Arrow record batches in the shard schema.

    Args:
        path: the TSV file, plain or gzip (detected from its first bytes, not its name).
        labelled: True for 40 fields, False for 39; None detects it from the file's head.
        block_size: bytes pyarrow parses at a time.
        on_reject: called with each `Reject`, in line order; when None they are kept in
            `rejects`.
        name: the file name written into rejects and errors (defaults to `path`).
        on_progress: called now and then with the number of file bytes read since the last
            call (compressed bytes for gzip).

    After iteration, `stats` holds the counts and any truncation; warnings for an empty, blank
    or truncated file are issued as `CriteoInputWarning` and recorded in `stats.warnings`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        labelled: bool | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        on_reject: Callable[[Reject], None] | None = None,
        name: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ):
        self.path = Path(path)
        self.name = name if name is not None else str(path)
        detected = sniff_layout(self.path, labelled)
        self.labelled: bool = True if detected is None else detected
        self.schema = arrow_schema(self.labelled)
        self.block_size = block_size
        self.rejects: list[Reject] = []
        self._on_reject = on_reject if on_reject is not None else self.rejects.append
        self._on_progress = on_progress
        self.stats = ReadStats()
        self._names = column_names(self.labelled)
        self._bad_lines: list[int] = []  # wrong-width line numbers, in order
        self._bad_shifted = np.empty(0, dtype=np.int64)  # w_i - i, see _line_numbers
        self._pending: list[Reject] = []  # wrong-width rejects not yet emitted in line order
        self._parsed_rows = 0  # rows pyarrow produced so far, blank ones included

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        stream = LineStream(self.path)
        reported = 0
        try:
            for raw in self._open(stream):
                batch = self._convert(raw)
                self._check_is_criteo(at_end=False)
                if self._on_progress is not None:
                    position = stream.raw_position
                    if position - reported >= _PROGRESS_EVERY:
                        self._on_progress(position - reported)
                        reported = position
                if batch.num_rows:
                    yield batch
        finally:
            stream.close()
        self._flush_pending(None)
        self.stats.lines = self._parsed_rows + len(self._bad_lines)
        self._check_is_criteo(at_end=True)
        self._finish(stream)
        if self._on_progress is not None:  # the whole file has been read by now
            self._on_progress(self.path.stat().st_size - reported)

    def _open(self, stream: LineStream) -> Iterator[pa.RecordBatch]:
        try:
            reader = pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(
                    column_names=self._names, block_size=self.block_size,
                    # Single-threaded parsing is what makes InvalidRow.number a line number.
                    use_threads=False,
                ),
                parse_options=pcsv.ParseOptions(
                    delimiter="\t", quote_char=False, escape_char=False,
                    newlines_in_values=False,
                    # Blank lines must reach us as rows, or line numbers drift.
                    ignore_empty_lines=False,
                    invalid_row_handler=self._wrong_width,
                ),
                convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.binary() for c in self._names},
                    null_values=[""], strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid:
            if stream.delivered == 0:  # pyarrow refuses a stream with no bytes at all
                return iter(())
            raise
        return iter(reader)

    def _reject(self, line: int, reason: str, raw: str) -> None:
        # Whether a long line reached pyarrow whole or was capped by LineStream depends on
        # where blocks fall; reporting both alike keeps rejects files reproducible and small.
        if len(raw) > MAX_LINE_BYTES or raw == _MARKER_TEXT:
            reason, raw = _LONG_LINE_REASON, _MARKER_TEXT
        self._pending.append(Reject(self.name, line, reason, raw))

    def _wrong_width(self, row: Any) -> str:
        if row.number is None:  # never with use_threads=False; guard against a pyarrow change
            raise RuntimeError("pyarrow gave no line number for an invalid row")
        self._bad_lines.append(row.number)
        self._reject(
            row.number,
            f"wrong number of fields: {row.actual_columns}, expected {row.expected_columns}",
            row.text.rstrip("\r\n"),
        )
        return "skip"

    def _line_numbers(self, rows: np.ndarray) -> np.ndarray:
        """Line numbers of parsed rows (0-based indices among all parsed rows).

        Parsed rows fill the lines that are not wrong-width lines, in order; with the sorted
        wrong-width numbers w_i, the k-th parsed row (1-based) sits on line
        k + #{i : w_i - i <= k}.
        """
        if len(self._bad_shifted) != len(self._bad_lines):
            bad = np.asarray(self._bad_lines, dtype=np.int64)
            self._bad_shifted = bad - np.arange(len(bad))
        k = rows.astype(np.int64) + 1
        return k + np.searchsorted(self._bad_shifted, k, side="right")

    def _convert(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        n = raw.num_rows
        first_row = self._parsed_rows
        self._parsed_rows += n
        columns = raw.columns
        label, arrays, bad_by_column = self._parse(columns)
        keep = self._rows_to_keep(columns, first_row, _blank_rows(columns, n), bad_by_column)
        if n:  # wrong-width lines after this batch's last row wait for their turn
            self._flush_pending(int(self._line_numbers(np.array([first_row + n - 1]))[0]))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        if keep is not None:
            batch = batch.filter(pa.array(keep))
        self.stats.rows += batch.num_rows
        if label is not None:
            self.stats.positives += int(label.sum() if keep is None else label[keep].sum())
        return batch

    def _parse(self, columns: list[pa.Array]) -> tuple[
            np.ndarray | None, list[pa.Array], list[tuple[int, np.ndarray]]]:
        """(labels, the batch's columns in the shard schema, (column, bad rows) of every
        column with a field that does not parse)."""
        arrays: list[pa.Array] = []
        bad_by_column: list[tuple[int, np.ndarray]] = []
        label = None
        parsers = [_parse_dense] * len(DENSE_COLUMNS) + [_parse_sparse] * len(SPARSE_COLUMNS)
        if self.labelled:
            label, bad = _parse_label(columns[0])
            arrays.append(pa.array(label))
            if bad is not None:
                bad_by_column.append((0, bad))
        offset = 1 if self.labelled else 0
        for j, parse in enumerate(parsers, start=offset):
            values, bad = parse(columns[j])
            arrays.append(values)
            if bad is not None:
                bad_by_column.append((j, bad))
        return label, arrays, bad_by_column

    def _rows_to_keep(self, columns: list[pa.Array], first_row: int, blank: np.ndarray | None,
                      bad_by_column: list[tuple[int, np.ndarray]]) -> np.ndarray | None:
        """Rows of the batch that are neither blank nor rejected (None: all of them); the
        rejected ones are recorded, each with the reason of its first bad field."""
        if not bad_by_column and blank is None:
            return None
        n = len(columns[0])
        drop = np.zeros(n, dtype=bool) if blank is None else blank.copy()
        rejected = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        for col, bad in bad_by_column:
            for i in np.flatnonzero(bad & ~drop & ~rejected):
                reasons[int(i)] = _why(self._names[col], columns[col][i].as_py())
            rejected |= bad & ~drop
        if blank is not None:
            self.stats.blank_lines += int(blank.sum())
        drop |= rejected
        self._reject_rows(columns, first_row, reasons)
        return ~drop

    def _reject_rows(self, columns: list[pa.Array], first_row: int,
                     reasons: dict[int, str]) -> None:
        if not reasons:
            return
        rows = np.fromiter(reasons, dtype=np.int64, count=len(reasons))
        lines = self._line_numbers(first_row + rows)
        taken = pa.array(rows)
        raw = pc.binary_join_element_wise(
            *[pc.take(c, taken) for c in columns], b"\t",
            null_handling="replace", null_replacement=b"",
        )
        for i, line, text in zip(rows, lines, raw.to_pylist(), strict=True):
            self._reject(int(line), reasons[int(i)], text.decode("ascii"))

    def _flush_pending(self, up_to_line: int | None) -> None:
        """Emit buffered rejects in line order, up to a line (all when None)."""
        if not self._pending:
            return
        self._pending.sort(key=lambda r: r.line)
        if up_to_line is None:
            ready, self._pending = self._pending, []
        else:
            cut = 0
            while cut < len(self._pending) and self._pending[cut].line <= up_to_line:
                cut += 1
            ready, self._pending = self._pending[:cut], self._pending[cut:]
        self.stats.rejects += len(ready)
        for reject in ready:
            self._on_reject(reject)

    def _check_is_criteo(self, *, at_end: bool) -> None:
        seen = self.stats.rows + self.stats.rejects + len(self._pending)
        if self.stats.rows == 0 and seen and (at_end or seen >= FAIL_FAST_LINES):
            raise NotCriteoError(
                self.name,
                f"none of its first {seen} non-blank lines is a valid Criteo row "
                f"({'40' if self.labelled else '39'} fields: label 0/1, integers, hex)",
            )

    def _finish(self, stream: LineStream) -> None:
        stats = self.stats
        if stream.truncated is not None:
            stats.truncated = (
                f"{stream.truncated}; kept the {stats.lines} complete lines before the cut"
                + (f", dropped a partial line of {stream.dropped_bytes} bytes"
                   if stream.dropped_bytes else "")
            )
            stats.warnings.append(f"{self.name}: {stats.truncated}")
        if stats.lines == 0 and stream.truncated is None:
            stats.warnings.append(f"{self.name}: empty file, converted to zero rows")
        elif stats.rows == 0 and stats.lines and stats.lines == stats.blank_lines:
            stats.warnings.append(
                f"{self.name}: only blank lines ({stats.blank_lines}), converted to zero rows")
        for message in stats.warnings:
            warnings.warn(message, CriteoInputWarning, stacklevel=3)


def _blank_rows(columns: list[pa.Array], n: int) -> np.ndarray | None:
    """Rows whose every field is empty (blank lines, to pyarrow), or None when there are none."""
    if not n or not all(c.null_count for c in columns):
        return None
    blank = np.logical_and.reduce([c.is_null().to_numpy(zero_copy_only=False) for c in columns])
    return blank if blank.any() else None


def read_criteo(
    path: str | Path, *, labelled: bool | None = None, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[pa.Table, ReadStats, list[Reject]]:
    """A whole file as one table, with its stats and rejects (small files, tests, tools)."""
    reader = CriteoReader(path, labelled=labelled, block_size=block_size)
    table = pa.Table.from_batches(list(reader), schema=reader.schema)
    return table, reader.stats, reader.rejects
