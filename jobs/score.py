"""`python -m jobs.score`: score a Criteo TSV file against a running embpress scoring service.

The file is read by the same reader that converts training data (`data_pipeline.criteo`),
so a line the service is sent is a line training would have accepted, with or without the
label column; rejected lines are reported, never sent. Rows go out in batches over one
keep-alive connection per worker thread, in order, and come back as one probability per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pyarrow as pa

from data_pipeline.criteo import CriteoReader, NotCriteoError, Reject
from data_pipeline.schema import DENSE_COLUMNS, LABEL, SPARSE_COLUMNS

TOKEN_ENV = "EMBPRESS_API_TOKEN"
DEFAULT_BATCH = 1024
RETRIES = 3
# A direct-ingress port belongs to one replica and changes when Serve replaces it.
MOVED_HINT = ("if this was a replica's direct-ingress port, a rolling restart may have moved "
              "it: `RAY_ADDRESS=auto python -m jobs.serve --urls` prints the current URLs, "
              "and the Serve proxy's port never moves")

DESCRIPTION = """\
Score Criteo rows with a running embpress scoring service (python -m jobs.serve, or
serve run deploy/serve.yaml).

Input: Criteo TSV, plain or gzip, 40 fields (label first, like train.txt) or 39 (no label,
like test.txt), detected from the file. Lines the training reader would reject (wrong number
of fields, a non-integer I field, a non-hex C field) are not sent: they are counted and
written to --rejects. Output: a header line, then one line per scored row in input order:
`probability`, or `label<TAB>probability` when the input has labels.
"""

EPILOG = """\
examples:
  python -m jobs.score --url http://127.0.0.1:8000 --input test.txt --output scores.tsv
  EMBPRESS_API_TOKEN=... python -m jobs.score --url http://scoring:8000 --input day_23.gz
"""


class ScoringError(RuntimeError):
    """The service refused or failed a request; the message says what it answered."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.score", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True,
                        help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--input", required=True, metavar="FILE", help="Criteo TSV (or .gz)")
    parser.add_argument("--output", metavar="FILE", help="scores file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                        help="rows per request (default: %(default)s; lowered to the "
                             "service's maximum when that is smaller)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token, when the service needs one (default: ${TOKEN_ENV})")
    parser.add_argument("--concurrency", type=int, default=2, metavar="N",
                        help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--rejects", metavar="FILE",
                        help="write rejected input lines here as JSON lines")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for one answer (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


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


def _chunks(reader: CriteoReader, size: int) -> Iterator[pa.Table]:
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
            for table in _chunks(reader, batch_size):
                window.append((table, pool.submit(client.score, request_rows(table))))
                if len(window) >= concurrency:
                    finish(window.popleft())
            while window:
                finish(window.popleft())
        finally:
            for _, future in window:
                future.cancel()
    return versions


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.concurrency < 1:
        print("score: error: --batch-size and --concurrency must be at least 1", file=sys.stderr)
        return 2
    if not Path(args.input).is_file():
        print(f"score: error: no such input file: {args.input}", file=sys.stderr)
        return 2
    rejects: list[Reject] = []
    try:
        reader = CriteoReader(args.input, on_reject=rejects.append)
    except NotCriteoError as exc:
        print(f"score: error: {exc}", file=sys.stderr)
        return 2
    client = ScoringClient(args.url, args.token or os.environ.get(TOKEN_ENV), args.timeout)
    started = time.perf_counter()
    try:
        limit = client.max_rows()
        batch_size = args.batch_size
        if limit and batch_size > limit:
            print(f"score: the service takes at most {limit} rows per request; "
                  f"sending batches of {limit}", file=sys.stderr)
            batch_size = limit
        with ExitStack() as stack:
            out = (stack.enter_context(open(args.output, "w")) if args.output
                   else sys.stdout)
            versions = score_file(client, reader, out, batch_size, args.concurrency,
                                  progress=not args.no_progress)
    except ScoringError as exc:
        print(f"score: error: {exc}", file=sys.stderr)
        return 1
    except NotCriteoError as exc:
        print(f"score: error: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    elapsed = time.perf_counter() - started
    rows = sum(versions.values())
    print(f"score: {rows:,} rows scored in {elapsed:.1f} s ({rows / max(elapsed, 1e-9):,.0f} "
          f"rows/s), model version{'s' if len(versions) > 1 else ''} "
          + ", ".join(f"{v} ({n:,} rows)" for v, n in versions.items()), file=sys.stderr)
    if rejects:
        where = ""
        if args.rejects:
            Path(args.rejects).write_text("".join(r.to_json() + "\n" for r in rejects))
            where = f", listed in {args.rejects}"
        print(f"score: {len(rejects):,} input lines rejected and not scored{where}; first: "
              f"line {rejects[0].line}: {rejects[0].reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
