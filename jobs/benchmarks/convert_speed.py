"""Benchmark: Criteo TSV → Parquet conversion MB/s against a bare pyarrow.csv read of the file.

The goal (issue 2) is a conversion at ≥ 0.6 of the speed of merely reading the same file with
pyarrow's streaming CSV reader, measured in the same run so machine load affects both alike.
"Ours" is `convert_file` end to end: input checksum, validation, rejects, Parquet writing and
shard checksums. Run: `python jobs/benchmarks/convert_speed.py [--size-mb 200]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow.csv as pcsv

from data_pipeline.convert import convert_file
from data_pipeline.criteo import CriteoReader

REAL_DATA = Path(os.environ.get("EMBPRESS_REAL_DATA",
                                Path(__file__).resolve().parents[3] / "shared" / "data"))
SAMPLES = ("criteo_kaggle_sample.tsv", "criteo_terabyte_day0_sample.tsv")


def _synthetic_block(rows: int, seed: int = 0) -> bytes:
    """Criteo-shaped lines with Criteo-like missing rates, for when the real samples are absent."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        label = "1" if rng.random() < 0.25 else "0"
        dense = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.exponential(20, 13)]
        cats = [f"{int(v):08x}" if rng.random() > 0.1 else ""
                for v in rng.integers(0, 2**32, 26)]
        lines.append("\t".join([label, *dense, *cats]))
    return ("\n".join(lines) + "\n").encode()


def make_input(path: Path, size_mb: int) -> str:
    """Write about `size_mb` MB of Criteo TSV; real sample rows repeated when available."""
    if all((REAL_DATA / name).is_file() for name in SAMPLES):
        block = b"".join((REAL_DATA / name).read_bytes() for name in SAMPLES)
        source = "real Kaggle + Terabyte sample rows, repeated"
    else:
        block = _synthetic_block(20_000)
        source = "synthetic Criteo-shaped rows (real samples not found)"
    with open(path, "wb") as f:
        for _ in range(max(1, round(size_mb * 1e6 / len(block)))):
            f.write(block)
    return source


def bare_stream(path: Path) -> int:
    reader = pcsv.open_csv(
        path, read_options=pcsv.ReadOptions(autogenerate_column_names=True),
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
    )
    return sum(batch.num_rows for batch in reader)


def bare_table(path: Path) -> int:
    return pcsv.read_csv(
        path, read_options=pcsv.ReadOptions(autogenerate_column_names=True),
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
    ).num_rows


def reader_only(path: Path) -> int:
    return sum(batch.num_rows for batch in CriteoReader(path))


def convert_once(path: Path, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    return convert_file(path, out, 0)["rows"]


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    rows = fn()
    return rows, time.perf_counter() - wall0, time.process_time() - cpu0


BARE = "bare pyarrow.csv.open_csv (stream)"
OURS = "convert_file (read+validate+write)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="size of the generated file")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each runs every method")
    parser.add_argument("--file", type=Path, help="benchmark this TSV file instead")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="embpress-convert-speed-"))
    try:
        if args.file:
            path, source = args.file, str(args.file)
        else:
            path = work / "day_0"
            source = make_input(path, args.size_mb)
        size_mb = path.stat().st_size / 1e6
        runs = {
            BARE: lambda: bare_stream(path),
            "bare pyarrow.csv.read_csv (table)": lambda: bare_table(path),
            "CriteoReader only (parse+validate)": lambda: reader_only(path),
            OURS: lambda: convert_once(path, work / "out"),
        }
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        rows = set()
        # Rounds run every method back to back, so a load change on a shared machine hits
        # both sides of a ratio alike; the median of the per-round ratios is the figure.
        for _ in range(args.repeat):
            for name, fn in runs.items():
                n, w, c = timed(fn)
                rows.add(n)
                wall[name].append(w)
                cpu[name].append(c)
        if len(rows) != 1:
            print(f"row counts differ between methods: {sorted(rows)}", file=sys.stderr)
            return 1
        print(f"input: {size_mb:.0f} MB, {rows.pop():,} rows ({source}); {args.repeat} rounds, "
              f"{os.cpu_count()} CPUs")
        print(f"{'method':36s} {'MB/s':>7s} {'wall s':>7s} {'cpu s':>7s} {'× bare':>7s}")
        for name in runs:
            ratio = statistics.median(b / w for b, w in zip(wall[BARE], wall[name], strict=True))
            print(f"{name:36s} {size_mb / statistics.median(wall[name]):7.1f} "
                  f"{statistics.median(wall[name]):7.2f} {statistics.median(cpu[name]):7.2f} "
                  f"{ratio:7.2f}")
        ratio = statistics.median(b / w for b, w in zip(wall[BARE], wall[OURS], strict=True))
        cpu_ratio = statistics.median(cpu[BARE]) / statistics.median(cpu[OURS])
        print(f"conversion MB/s / bare open_csv MB/s = {ratio:.2f} (goal ≥ 0.60: "
              f"{'met' if ratio >= 0.6 else 'NOT met'}); by CPU time {cpu_ratio:.2f} "
              "(shards are written on a second thread)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
