"""`python -m jobs.score`: score a Criteo TSV file against a running embpress scoring service.

The reading, batching and HTTP are `services.client`'s; this is the command line around it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from data_pipeline.criteo import CriteoReader, NotCriteoError, Reject
from services.auth import TOKEN_ENV
from services.client import ScoringClient, ScoringError, score_file

DEFAULT_BATCH = 1024

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


def _error(message: object, code: int) -> int:
    print(f"score: error: {message}", file=sys.stderr)
    return code


def _score(args: argparse.Namespace, reader: CriteoReader) -> Counter[str]:
    """Score the file at the service's batch limit; raises ScoringError or NotCriteoError."""
    client = ScoringClient(args.url, args.token or os.environ.get(TOKEN_ENV), args.timeout)
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
            return score_file(client, reader, out, batch_size, args.concurrency,
                              progress=not args.no_progress)
    finally:
        client.close()


def _report(versions: Counter[str], elapsed: float, rejects: list[Reject],
            rejects_file: str | None) -> None:
    rows = sum(versions.values())
    print(f"score: {rows:,} rows scored in {elapsed:.1f} s ({rows / max(elapsed, 1e-9):,.0f} "
          f"rows/s), model version{'s' if len(versions) > 1 else ''} "
          + ", ".join(f"{v} ({n:,} rows)" for v, n in versions.items()), file=sys.stderr)
    if rejects:
        where = ""
        if rejects_file:
            Path(rejects_file).write_text("".join(r.to_json() + "\n" for r in rejects))
            where = f", listed in {rejects_file}"
        print(f"score: {len(rejects):,} input lines rejected and not scored{where}; first: "
              f"line {rejects[0].line}: {rejects[0].reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.concurrency < 1:
        return _error("--batch-size and --concurrency must be at least 1", 2)
    if not Path(args.input).is_file():
        return _error(f"no such input file: {args.input}", 2)
    rejects: list[Reject] = []
    try:
        reader = CriteoReader(args.input, on_reject=rejects.append)
    except NotCriteoError as exc:
        return _error(exc, 2)
    started = time.perf_counter()
    try:
        versions = _score(args, reader)
    except ScoringError as exc:
        return _error(exc, 1)
    except NotCriteoError as exc:
        return _error(exc, 2)
    _report(versions, time.perf_counter() - started, rejects, args.rejects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
