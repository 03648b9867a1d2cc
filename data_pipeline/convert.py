"""Criteo TSV files → Parquet shards `OUT/day=N/part-XXXXX.parquet`, many files at once on Ray.

Conversion of a Terabyte day takes minutes and is interrupted in practice (killed job, full
disk), so it is built to be re-run: every shard is written under a temporary name and renamed,
each input gets a done-marker once all its shards exist, and `manifest.json` is written last.
Running the same conversion again converts only the inputs without a valid marker and gives
byte-identical shards for the same input.

Layout of the output folder:

* ``day=N/part-XXXXX.parquet``: the rows of one input, ``rows_per_shard`` rows per shard (the
  last one shorter; a file with no rows gets one empty shard so every day has a schema). N is
  the number in a ``day_N`` file name (Terabyte's naming, ``day_3.gz`` too), else the input's
  position in the input list.
* ``_rejects/day=N.jsonl``: one JSON object per rejected line: ``file``, ``line``,
  ``reason``, ``raw`` (see `data_pipeline.criteo` for what is rejected).
* ``_done/day=N.json``: the input's checksum, counts and shard checksums once it is complete.
* ``manifest.json``: rows, positives, rejects, blank lines, truncation and warnings per input,
  sha256 of every input and shard, the schema version and whether rows carry a label. The
  ``days`` mapping has the same shape as the synthetic generator's manifest.

Folders starting with ``_`` are ignored by pyarrow and Ray Data dataset discovery.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import shards
from data_pipeline.criteo import (
    DEFAULT_BLOCK_SIZE,
    CriteoInputWarning,
    CriteoReader,
    NotCriteoError,
    Reject,
    column_names,
    sniff_layout,
)
from data_pipeline.schema import SCHEMA_VERSION

DEFAULT_ROWS_PER_SHARD = 1_000_000
DONE_DIR = "_done"
REJECTS_DIR = "_rejects"
# CPUs each conversion task reserves (one file, one core: the parse is single-threaded).
CONVERT_TASK_CPUS = 1
# Bumped when the converter's output for the same input changes, so old markers are not trusted.
CONVERTER_VERSION = 1
_DAY_NAME = re.compile(r"^day_(\d+)(?:\.[A-Za-z0-9]+)*$")
_OUR_FILES = re.compile(r"^(part-\d+\.parquet|\.part-\d+\.parquet\.tmp-\d+)$")


@dataclass(frozen=True)
class InputFile:
    """One input and the day folder its shards go to."""

    path: Path
    day: int
    name: str


def plan_inputs(inputs: Sequence[str | Path]) -> list[InputFile]:
    """Give every input its day: N for a ``day_N`` name, else its index in `inputs`.

    Raises FileNotFoundError for a missing input, and ValueError for a file listed twice or two
    inputs that would share a day folder (e.g. ``day_1`` listed after another file).
    """
    plans = []
    seen: dict[Path, str] = {}
    for index, raw in enumerate(inputs):
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"input {raw} does not exist or is not a file")
        if path.resolve() in seen:
            raise ValueError(f"input {raw} is listed twice (also as {seen[path.resolve()]})")
        seen[path.resolve()] = str(raw)
        match = _DAY_NAME.match(path.name)
        plans.append(InputFile(path, int(match[1]) if match else index, str(raw)))
    by_day: dict[int, list[str]] = {}
    for p in plans:
        by_day.setdefault(p.day, []).append(p.name)
    clashes = {d: names for d, names in by_day.items() if len(names) > 1}
    if clashes:
        detail = "; ".join(f"day={d}: {', '.join(n)}" for d, n in sorted(clashes.items()))
        raise ValueError(
            f"inputs would share a day folder ({detail}); a day comes from a day_N file name, "
            "else from the file's position in the input list"
        )
    return plans


def done_marker_path(output_dir: str | Path, day: int) -> Path:
    return Path(output_dir) / DONE_DIR / f"day={day}.json"


def rejects_path(output_dir: str | Path, day: int) -> Path:
    return Path(output_dir) / REJECTS_DIR / f"day={day}.jsonl"


def _params(rows_per_shard: int, labelled: bool | None) -> dict[str, Any]:
    return {
        "rows_per_shard": rows_per_shard,
        "labelled": labelled,
        "schema_version": SCHEMA_VERSION,
        "converter_version": CONVERTER_VERSION,
    }


def _load_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _intact(output_dir: Path, marker: dict[str, Any]) -> bool:
    """Every shard the marker lists is there with its checksum, and so is the rejects file."""
    if not (output_dir / marker["rejects_file"]).is_file():
        return False
    for f in marker["files"]:
        path = output_dir / f["path"]
        if not path.is_file() or path.stat().st_size != f["bytes"]:
            return False
        if shards.sha256_file(path) != f["sha256"]:
            return False
    return True


def _clear_day(output_dir: Path, day: int) -> None:
    """Remove what an earlier or interrupted conversion left in this day's folder."""
    folder = shards.day_dir(output_dir, day)
    if folder.is_dir():
        for f in folder.iterdir():
            if _OUR_FILES.match(f.name):
                f.unlink()
    for side in (output_dir / DONE_DIR, output_dir / REJECTS_DIR):
        if side.is_dir():
            for f in side.glob(f".day={day}.*.tmp-*"):
                f.unlink()


class _ShardWriter:
    """Cuts the reader's batches into shards and row groups, and writes them on a thread.

    Parquet encoding and zstd run in C++ without the GIL, so compressing one row group overlaps
    with parsing the next. That matters because Kaggle's `train.txt` is a single file: the
    parallelism across inputs that Ray gives does nothing for it. The files are those
    `shards.write_table_atomic` would write for the same rows (same row groups and options):
    a temporary name, renamed when complete.
    """

    _DONE = None

    def __init__(self, output_dir: Path, day: int, schema: pa.Schema, rows_per_shard: int):
        self._output_dir, self._day, self._schema = output_dir, day, schema
        self._rows_per_shard = rows_per_shard
        self._batches: list[pa.RecordBatch] = []
        self._group_rows = 0  # rows in self._batches
        self._shard_rows = 0  # rows of the current shard handed to the thread
        self._part = 0
        self.files: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        # A few row groups in flight bound memory (about 35 MB each) whatever the shard size.
        self._queue: queue.Queue[tuple[int, pa.Table | None] | None] = queue.Queue(maxsize=3)
        self._thread = threading.Thread(target=self._run, name=f"shards-day{day}", daemon=True)
        self._thread.start()

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            room = min(self._rows_per_shard - self._shard_rows - self._group_rows,
                       shards.ROW_GROUP_ROWS - self._group_rows)
            self._batches.append(batch.slice(0, room))
            self._group_rows += min(room, batch.num_rows)
            batch = batch.slice(room)
            if (self._group_rows == shards.ROW_GROUP_ROWS
                    or self._shard_rows + self._group_rows == self._rows_per_shard):
                self._flush_group()
            if self._shard_rows == self._rows_per_shard:
                self._end_shard()

    def finish(self) -> list[dict[str, Any]]:
        """Write what is left (one empty shard when there were no rows at all) and wait."""
        if self._group_rows:
            self._flush_group()
        if self._shard_rows or self._part == 0:
            self._end_shard()
        self._put(self._DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.files

    def abort(self) -> None:
        if self._thread.is_alive():
            self._put(self._DONE)
            self._thread.join()

    def _flush_group(self) -> None:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._put((self._part, table))
        self._shard_rows += self._group_rows
        self._batches, self._group_rows = [], 0

    def _end_shard(self) -> None:
        self._put((self._part, None))
        self._part += 1
        self._shard_rows = 0

    def _put(self, item: tuple[int, pa.Table | None] | None) -> None:
        while True:
            if self._error is not None and item is not self._DONE:
                raise self._error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        writer: pq.ParquetWriter | None = None
        tmp = final = None
        rows = 0
        while (item := self._queue.get()) is not self._DONE:
            if self._error is not None:
                continue  # drain, so the producer never blocks on a dead writer
            part, table = item
            try:
                if writer is None:
                    final = shards.shard_path(self._output_dir, self._day, part)
                    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                    final.parent.mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(tmp, self._schema, **shards.PARQUET_OPTIONS)
                    rows = 0
                if table is not None:
                    writer.write_table(table, row_group_size=shards.ROW_GROUP_ROWS)
                    rows += table.num_rows
                    continue
                writer.close()
                writer = None
                os.replace(tmp, final)
                self.files.append({
                    "path": final.relative_to(self._output_dir).as_posix(),
                    "rows": rows,
                    "sha256": shards.sha256_file(final),
                    "bytes": final.stat().st_size,
                })
            except BaseException as exc:  # handed to the producer thread, which re-raises it
                self._error = exc
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)


def convert_file(
    path: str | Path,
    output_dir: str | Path,
    day: int,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    labelled: bool | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    name: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Convert one Criteo TSV file into `output_dir/day=<day>/`, unless it already is.

    Plain function (no Ray): the `convert` driver runs it as a Ray task, tests call it directly.
    Returns the input's manifest entry (also written as its done-marker) with ``skipped`` set
    when a valid marker with the same input checksum and parameters was found. Raises
    `NotCriteoError` for a file that is not Criteo at all.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    path, output_dir = Path(path), Path(output_dir)
    name = str(path) if name is None else name
    size = path.stat().st_size
    params = _params(rows_per_shard, labelled)
    marker_path = done_marker_path(output_dir, day)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
        # hashlib releases the GIL: the input's checksum is computed while it is converted.
        digest = pool.submit(shards.sha256_file, path)
        marker = _load_marker(marker_path)
        if (marker is not None and marker.get("params") == params
                and marker.get("bytes") == size and marker.get("sha256") == digest.result()
                and _intact(output_dir, marker)):
            if on_progress is not None:
                on_progress(size)
            for message in marker["warnings"]:
                warnings.warn(message, CriteoInputWarning, stacklevel=2)
            return {**marker, "skipped": True}
        entry = _convert_input(path, output_dir, day, name, labelled, block_size, on_progress,
                               rows_per_shard)
        entry = {"input": name, "path": str(path.resolve()), "bytes": size,
                 "sha256": digest.result(), **entry, "params": params}
    shards.write_json_atomic(entry, marker_path)
    for message in entry["warnings"]:
        warnings.warn(message, CriteoInputWarning, stacklevel=2)
    return {**entry, "skipped": False}


def _convert_input(path: Path, output_dir: Path, day: int, name: str, labelled: bool | None,
                   block_size: int, on_progress: Callable[[int], None] | None,
                   rows_per_shard: int) -> dict[str, Any]:
    sink: list[TextIO] = []  # the rejects file, opened once the old output is cleared

    def write_reject(reject: Reject) -> None:
        sink[0].write(reject.to_json() + "\n")

    # Sniffing happens here, before anything of the old output is touched.
    reader = CriteoReader(path, labelled=labelled, block_size=block_size, name=name,
                          on_reject=write_reject, on_progress=on_progress)
    done_marker_path(output_dir, day).unlink(missing_ok=True)
    _clear_day(output_dir, day)
    shards.day_dir(output_dir, day).mkdir(parents=True, exist_ok=True)
    final_rejects = rejects_path(output_dir, day)
    final_rejects.parent.mkdir(parents=True, exist_ok=True)
    tmp_rejects = final_rejects.with_name(f".{final_rejects.name}.tmp-{os.getpid()}")
    writer = _ShardWriter(output_dir, day, reader.schema, rows_per_shard)
    try:
        with open(tmp_rejects, "w", encoding="utf-8") as f:
            sink.append(f)
            # The reader's warnings are issued once, by convert_file, from the entry.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CriteoInputWarning)
                for batch in reader:
                    writer.add(batch)
            files = writer.finish()
        os.replace(tmp_rejects, final_rejects)
    finally:
        writer.abort()
        tmp_rejects.unlink(missing_ok=True)
    stats = reader.stats
    return {
        "day": day,
        "labelled": reader.labelled,
        "rows": stats.rows,
        "positives": stats.positives,
        "rejects": stats.rejects,
        "blank_lines": stats.blank_lines,
        "lines": stats.lines,
        "truncated": stats.truncated,
        "warnings": stats.warnings,
        "rejects_file": final_rejects.relative_to(output_dir).as_posix(),
        "files": files,
    }


def _convert_file_on_worker(*args: Any, **kwargs: Any) -> dict[str, Any]:
    # The driver re-issues the entry's warnings; a second copy from the worker's log is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CriteoInputWarning)
        return convert_file(*args, **kwargs)


def _report_progress(actor: Any, n: int) -> None:
    actor.add.remote(n)


@functools.cache
def _progress_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        """Bytes read by all conversion tasks, polled by the driver's progress bar."""

        def __init__(self) -> None:
            self.total = 0

        def add(self, n: int) -> None:
            self.total += n

        def get(self) -> int:
            return self.total

    return ProgressCounter


def _run_on_ray(plans: list[InputFile], output_dir: Path, kwargs: dict[str, Any],
                bar: Any) -> list[dict[str, Any]]:
    import ray

    counter = _progress_actor_class().remote()
    task = ray.remote(num_cpus=CONVERT_TASK_CPUS)(_convert_file_on_worker)
    refs = {
        task.remote(p.path, output_dir, p.day, name=p.name,
                    on_progress=functools.partial(_report_progress, counter), **kwargs): i
        for i, p in enumerate(plans)
    }
    results: list[dict[str, Any] | None] = [None] * len(plans)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                try:
                    results[refs[ref]] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    # The input's own error (e.g. NotCriteoError naming the file) reads better
                    # than Ray's wrapper; the remote traceback stays attached as the cause.
                    if isinstance(exc.cause, (NotCriteoError, ValueError, OSError)):
                        raise exc.cause from exc
                    raise
            bar.update(ray.get(counter.get.remote()) - bar.n)
    finally:
        for ref in pending:
            ray.cancel(ref)
        ray.kill(counter)
    return [r for r in results if r is not None]


def _manifest(entries: list[dict[str, Any]], labelled: bool, rows_per_shard: int) -> dict[str, Any]:
    days = {
        str(e["day"]): {
            "rows": e["rows"],
            "positives": e["positives"],
            "rejects": e["rejects"],
            "input": e["input"],
            "files": [{"path": f["path"], "rows": f["rows"], "sha256": f["sha256"]}
                      for f in e["files"]],
        }
        for e in sorted(entries, key=lambda e: e["day"])
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "criteo",
        "format": "parquet",
        "labelled": labelled,
        "columns": column_names(labelled),
        "rows": sum(e["rows"] for e in entries),
        "positives": sum(e["positives"] for e in entries),
        "rejects": sum(e["rejects"] for e in entries),
        "blank_lines": sum(e["blank_lines"] for e in entries),
        "rows_per_shard": rows_per_shard,
        "days": days,
        "inputs": entries,
        "truncated": [e["input"] for e in entries if e["truncated"]],
        "warnings": [w for e in entries for w in e["warnings"]],
    }


def _shared_layout(plans: Sequence[InputFile], labelled: bool | None) -> bool:
    """Whether the inputs have a label column: `labelled` when given (each file is still
    sniffed, so a file that is not Criteo fails here), else what the files agree on."""
    layouts = {p.name: sniff_layout(p.path, labelled) for p in plans}
    known = {v for v in layouts.values() if v is not None}
    if len(known) > 1:
        detail = ", ".join(f"{n}: {'40' if v else '39'} fields"
                           for n, v in layouts.items() if v is not None)
        raise ValueError(f"inputs mix labelled and unlabelled Criteo files ({detail}); "
                         "convert them into separate output folders")
    return labelled if labelled is not None else (known.pop() if known else True)


def _warn_stale_days(output_dir: Path, plans: Sequence[InputFile]) -> None:
    wanted = {f"day={p.day}" for p in plans}
    stale = sorted(d.name for d in output_dir.glob("day=*") if d.is_dir() and d.name not in wanted)
    if stale:
        # stacklevel 3: the warning names the line that called `convert`.
        warnings.warn(f"{output_dir}: folders {', '.join(stale)} are from an earlier conversion "
                      "and not in this manifest", CriteoInputWarning, stacklevel=3)


def convert(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    labelled: bool | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    use_ray: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert Criteo TSV files into shards under `output_dir` and write its manifest (last).

    Args:
        inputs: TSV files, plain or gzip; one day folder each (see `plan_inputs`).
        output_dir: the dataset folder; created if missing. Inputs already converted there
            (valid done-marker, same checksum and parameters) are skipped.
        rows_per_shard: rows per Parquet file.
        labelled: True for 40-field files, False for 39-field ones; None detects it. All inputs
            of one dataset must agree.
        block_size: bytes pyarrow parses at a time.
        use_ray: one Ray task per input (Ray starts with defaults if not initialised); False
            converts one file after the other in this process.
        progress: show a tqdm bar of input bytes read.

    Returns the manifest. Raises `NotCriteoError` (naming the file) before converting anything
    when an input is not Criteo at all, and ValueError for clashing days or mixed layouts.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    plans = plan_inputs(inputs)
    layout = _shared_layout(plans, labelled)
    output_dir.mkdir(parents=True, exist_ok=True)
    # From here on the folder is being changed: no manifest until it is consistent again.
    (output_dir / shards.MANIFEST).unlink(missing_ok=True)
    for leftover in output_dir.glob(f".{shards.MANIFEST}.tmp-*"):
        leftover.unlink()
    kwargs = {"rows_per_shard": rows_per_shard, "labelled": layout, "block_size": block_size}
    total = sum(p.path.stat().st_size for p in plans)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
              disable=not progress) as bar:
        if use_ray:
            entries = _run_on_ray(plans, output_dir, kwargs, bar)
            for e in entries:
                for message in e["warnings"]:
                    warnings.warn(message, CriteoInputWarning, stacklevel=2)
        else:
            entries = [convert_file(p.path, output_dir, p.day, name=p.name,
                                    on_progress=bar.update, **kwargs) for p in plans]
        bar.update(total - bar.n)
    _warn_stale_days(output_dir, plans)
    manifest = _manifest(entries, layout, rows_per_shard)
    shards.write_json_atomic(manifest, output_dir / shards.MANIFEST)
    return manifest
