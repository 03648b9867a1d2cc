"""Synthetic generation speed to Parquet, in rows per second per core (goal: ≥ 1M).

Per core: parts generated and written one after the other in this process, timed in CPU
seconds (so other load on the machine counts less), split into generating rows (numba kernel
and Arrow columns), encoding Parquet (`shards.write_table_atomic` with
`shards.PARQUET_OPTIONS`) and the SHA-256 recorded in the manifest. Then the whole
`generate()` through Ray tasks on every CPU, in wall seconds divided by the CPUs.

    python jobs/benchmarks/synth_speed.py [--rows N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import os
import tempfile
import time

from data_pipeline import shards, synthetic
from data_pipeline.synthetic import SynthConfig, generate


def per_core(config: SynthConfig, out: Path) -> dict[str, float]:
    synthetic.generate_rows(config, 0, 0, 1000)  # compile / load the kernels, calibrate
    cpu = {"generate rows": 0.0, "encode Parquet": 0.0, "sha256": 0.0}
    for day, part, start, stop in synthetic.writers.parts(config):
        c0 = time.process_time()
        table, _ = synthetic.rows.generate_part(config, day, start, stop, reuse=True)
        c1 = time.process_time()
        path = shards.shard_path(out, day, part)
        shards.write_table_atomic(table, path)
        c2 = time.process_time()
        shards.sha256_file(path)
        c3 = time.process_time()
        cpu["generate rows"] += c1 - c0
        cpu["encode Parquet"] += c2 - c1
        cpu["sha256"] += c3 - c2
        del table
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000)
    args = parser.parse_args(argv)
    config = SynthConfig(rows=args.rows, days=2, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        cpu = per_core(config, Path(tmp) / "single")
        import ray

        cpus = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
        generate(SynthConfig(rows=cpus * config.part_rows, days=cpus, seed=2),
                 Path(tmp) / "warm")  # start and warm the workers
        t0 = time.perf_counter()
        generate(config, Path(tmp) / "ray")
        wall = time.perf_counter() - t0
        ray.shutdown()

    total = sum(cpu.values())
    print(f"\nSynthetic generation to Parquet: {args.rows:,} rows, default settings "
          f"(scale {config.scale:g}), parts of {config.part_rows:,} rows")
    print(f"{'stage (one core, CPU time)':<40} {'ns/row':>8} {'rows/s':>12}")
    for stage, seconds in cpu.items():
        print(f"{stage:<40} {seconds / args.rows * 1e9:>8.0f} {args.rows / seconds:>12,.0f}")
    print(f"{'all, per core':<40} {total / args.rows * 1e9:>8.0f} {args.rows / total:>12,.0f}")
    print(f"{f'generate() with Ray, {cpus} CPUs, per CPU (wall)':<40} "
          f"{wall * cpus / args.rows * 1e9:>8.0f} {args.rows / wall / cpus:>12,.0f}")
    print(f"goal ≥ 1M rows/s per core: {'met' if args.rows / total >= 1e6 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
