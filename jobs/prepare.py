"""`python -m jobs.prepare`: convert Criteo TSV files into the Parquet shards training reads.

The entry point users submit with `ray job submit`; the work itself is
`data_pipeline.convert.convert` (one Ray task per input file) followed by the per-feature
frequency statistics written beside the shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from data_pipeline.convert import (
    CONVERT_TASK_CPUS,
    DEFAULT_ROWS_PER_SHARD,
    REJECTS_DIR,
    convert,
)
from data_pipeline.criteo import NotCriteoError
from jobs.data_job import add_task_flags, job_parser, ray_for_tasks
from jobs.preflight import check_tasks
from training.preflight import ResourcesUnavailable

SUMMARY_FILE = "summary.json"

DESCRIPTION = """\
Convert Criteo click logs (Kaggle train.txt / test.txt, Terabyte day_0..day_23; plain or
gzip, detected from content) into Parquet shards, converting the input files in parallel as
Ray tasks.

Output folder:
  day=N/part-XXXXX.parquet  the rows of one input (N from a day_N file name, else the
                            input's position in --input); label int8, I1..I13 int32,
                            C1..C26 int64 (hex value), empty fields are null
  _rejects/day=N.jsonl      every rejected line: file, line number, reason, raw text
  _done/day=N.json          marks an input as completely converted
  manifest.json             rows, positives, rejects, checksums, warnings
  summary.json              what this run printed last, for scripts

Lines with the wrong number of fields, a non-integer I field, a non-hex or over-long C field,
or a label other than 0/1 are rejected and counted; every good line is still converted. Blank
lines are skipped. A file that is not Criteo at all stops the run with its name. A truncated
.gz keeps the rows before the cut and is reported. Running the same command again converts
only what is missing, and gives byte-identical shards.
"""

EPILOG = """\
examples:
  python -m jobs.prepare --input day_0.gz day_1.gz --output data/terabyte
  python -m jobs.prepare --input train.txt --output data/kaggle --rows-per-shard 500000
  RAY_ADDRESS=http://127.0.0.1:8265 python -m jobs.prepare --input ... --output ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("python -m jobs.prepare", DESCRIPTION, EPILOG)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="Criteo TSV files (plain or .gz), one day folder each")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="dataset folder to write (created if missing)")
    parser.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                        metavar="N", help="rows per Parquet file (default: %(default)s)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--labelled", dest="labelled", action="store_const", const=True,
                        help="require 40 fields (label first); default: detect from the files")
    layout.add_argument("--unlabelled", dest="labelled", action="store_const", const=False,
                        help="require 39 fields (no label, like Kaggle's test.txt)")
    add_task_flags(parser, "convert the files")
    parser.add_argument("--wait-for-resources", type=float, default=0.0, metavar="S",
                        help="on a cluster that adds nodes on demand, wait up to S seconds "
                             "for a node with a CPU for the conversion tasks (default: "
                             "refuse at once)")
    return parser


def _write_feature_stats(output_dir: Path) -> Path:
    from data_pipeline.stats import write_feature_stats

    return Path(write_feature_stats(output_dir))


def prepare_summary(manifest: dict[str, Any], output: Path, stats_dir: Path) -> dict[str, Any]:
    """What the conversion kept and rejected, and where everything is."""
    return {
        "rows": manifest["rows"],
        "positives": manifest["positives"],
        "rejected": manifest["rejects"],
        "truncated_inputs": [e["input"] for e in manifest["inputs"] if e["truncated"]],
        "files": sum(len(d["files"]) for d in manifest["days"].values()),
        "shards": str(output),
        "rejects": str(output / REJECTS_DIR),
        "stats": str(stats_dir),
        "manifest": str(output / "manifest.json"),
    }


def format_summary(summary: dict[str, Any], path: Path) -> str:
    """The block the job prints last."""
    truncated = summary["truncated_inputs"]
    return "\n".join([
        "=== prepare: result ===",
        f"rows kept       {summary['rows']:,} ({summary['positives']:,} positives) in "
        f"{summary['files']} files under {summary['shards']}/day=N/",
        f"rows rejected   {summary['rejected']:,}, each with its file and line in "
        f"{summary['rejects']}/day=N.jsonl",
        *([f"TRUNCATED       {', '.join(truncated)}"] if truncated else []),
        f"statistics      {summary['stats']}",
        f"manifest        {summary['manifest']}",
        f"this summary    {path}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    with ray_for_tasks(args):
        try:
            if not args.no_ray:
                check_tasks(CONVERT_TASK_CPUS, "convert the files", args.wait_for_resources)
            manifest = convert(
                args.input, output,
                rows_per_shard=args.rows_per_shard, labelled=args.labelled,
                use_ray=not args.no_ray, progress=not args.no_progress,
            )
            stats_dir = _write_feature_stats(output)
        except (NotCriteoError, FileNotFoundError, ValueError, ResourcesUnavailable) as exc:
            print(f"prepare: error: {exc}", file=sys.stderr)
            return 2

    for entry in manifest["inputs"]:
        state = "already converted, skipped" if entry["skipped"] else "converted"
        print(f"{entry['input']} → day={entry['day']}: {entry['rows']:,} rows, "
              f"{entry['rejects']:,} rejects, {entry['blank_lines']:,} blank lines ({state})"
              + (f"; TRUNCATED: {entry['truncated']}" if entry["truncated"] else ""))
    summary = prepare_summary(manifest, output, stats_dir)
    path = output / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
