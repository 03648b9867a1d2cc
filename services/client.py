"""A client of the scoring API that scores a Criteo TSV file (`python -m jobs.score`).

The file is read by the same reader that converts training data (`data_pipeline.criteo`),
so a line the service is sent is a line training would have accepted, with or without the
label column; rejected lines are reported, never sent. Rows go out in batches over one
keep-alive connection per worker thread, in order, and come back as one probability per row.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import httpx
import numpy as np
import pyarrow as pa

from data_pipeline.criteo import CriteoReader
from data_pipeline.schema import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS
from services.auth import TOKEN_ENV

RETRIES = 3
# A direct-ingress port belongs to one replica and changes when Serve replaces it.
MOVED_HINT = ("if this was a replica's direct-ingress port, a rolling restart may have moved "
              "it: `RAY_ADDRESS=auto python -m jobs.serve --urls` prints the current URLs, "
              "and the Serve proxy's port never moves")


class ScoringError(RuntimeError):
    """The service refused or failed a request; the message says what it answered."""


def _hex_column(column: pa.Array) -> list[str | None]:
    values = column.fill_null(0).to_numpy(zero_copy_only=False)
    text: list[str | None] = np.char.mod("%08x", values).tolist()
    if column.null_count:
        for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)):
            text[i] = None
    return text


def request_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, list[Any]]]:
    """Reader rows (shard schema) → request rows in the array shape."""
    dense = [batch.column(name).to_pylist() for name in DENSE_COLUMNS]
    categorical = [_hex_column(batch.column(name)) for name in SPARSE_COLUMNS]
    by_row = zip(zip(*dense, strict=True), zip(*categorical, strict=True), strict=True)
    return [{"dense": list(d), "categorical": list(c)} for d, c in by_row]


def table_chunks(reader: CriteoReader, size: int) -> Iterator[pa.Table]:
    """The reader's rows in order, as tables of `size` rows (the last one may be shorter)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in reader:
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending, schema=reader.schema)


def _explain(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError):
        detail = response.text
    return f"HTTP {response.status_code}: {detail}"


class ScoringClient:
    """A thin client of POST /v1/score with retries for transient failures."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str) -> httpx.Response:
        try:
            return self.http.get(path)
        except httpx.HTTPError as exc:
            raise ScoringError(f"cannot reach {self.url}{path}: {exc}; {MOVED_HINT}") from None

    def max_rows(self) -> int | None:
        """The service's rows-per-request limit; raises ScoringError when it cannot serve."""
        ready = self._get("/readyz")
        if ready.status_code == 404:
            raise ScoringError(f"{self.url} is not an embpress scoring service (GET /readyz: 404)")
        if ready.status_code != 200:
            raise ScoringError(f"{self.url} has no model loaded yet ({_explain(ready)})")
        info = self._get("/v1/model")
        if info.status_code == 401:
            raise ScoringError(f"{self.url} needs a bearer token: pass --token or set "
                               f"${TOKEN_ENV} ({_explain(info)})")
        if info.status_code != 200:
            raise ScoringError(f"GET /v1/model: {_explain(info)}")
        return info.json().get("settings", {}).get("max_rows_per_request")

    def score(self, rows: list[dict[str, Any]]) -> tuple[list[float], str]:
        body = json.dumps({"rows": rows}).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in range(RETRIES + 1):
            try:
                response = self.http.post("/v1/score", content=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    answer = response.json()
                    return answer["probabilities"], answer["version"]
                if response.status_code not in (502, 503, 504):
                    raise ScoringError(f"POST /v1/score: {_explain(response)}")
                problem = _explain(response)
            if attempt < RETRIES:
                time.sleep(0.5 * 2**attempt)
        hint = f"; {MOVED_HINT}" if "Connect" in problem else ""
        raise ScoringError(f"POST /v1/score failed {RETRIES + 1} times; last: {problem}{hint}")


def score_file(
    client: ScoringClient,
    reader: CriteoReader,
    out: IO[str],
    batch_size: int,
    concurrency: int,
    progress: bool,
) -> Counter[str]:
    """Score every row the reader yields, writing lines in input order; versions seen."""
    from tqdm import tqdm

    versions: Counter[str] = Counter()
    out.write("label\tprobability\n" if reader.labelled else "probability\n")
    bar = tqdm(unit=" rows", disable=not progress, file=sys.stderr, smoothing=0.1)

    def finish(job: tuple[pa.Table, Future]) -> None:
        table, future = job
        probabilities, version = future.result()
        versions[version] += len(probabilities)
        if reader.labelled:
            labels = table.column(LABEL).to_pylist()
            out.writelines(f"{y}\t{p:.9g}\n" for y, p in zip(labels, probabilities, strict=True))
        else:
            out.writelines(f"{p:.9g}\n" for p in probabilities)
        bar.update(len(probabilities))

    with ThreadPoolExecutor(max_workers=concurrency) as pool, bar:
        window: deque[tuple[pa.Table, Future]] = deque()
        try:
            for table in table_chunks(reader, batch_size):
                window.append((table, pool.submit(client.score, request_rows(table))))
                if len(window) >= concurrency:
                    finish(window.popleft())
            while window:
                finish(window.popleft())
        finally:
            for _, future in window:
                future.cancel()
    return versions
