"""`python -m jobs.synth`: generate synthetic Criteo data with a planted teacher model.

The entry point users submit with `ray job submit`; the work itself is
`data_pipeline.synthetic.generate` (one Ray task per part file) followed, for Parquet, by the
per-feature frequency statistics written beside the shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline import synthetic
from data_pipeline.synthetic import PARQUET_FORMAT, TSV_FORMAT, SynthConfig
from jobs.data_job import add_task_flags, job_parser, ray_for_tasks

_CARDS = synthetic.scaled_cardinalities(synthetic.DEFAULT_SCALE)
DESCRIPTION = f"""\
Generate synthetic Criteo click logs: the same format, schema and skew as the real data, with
labels drawn from a planted "teacher" model, so the teacher's own AUC (recorded in the
manifest for train/validation/test) is the ceiling any model can reach.

  categorical C1..C26  Zipf popularity over the Terabyte cardinalities x --scale (default
                       {synthetic.DEFAULT_SCALE:g}: largest feature {max(_CARDS):,} values,
                       {sum(_CARDS):,} in all; features of <= 64 values keep their real
                       size); values are 32-bit hashes
  dense I1..I13        Criteo-like ranges and missing rates (I2 has negatives)
  label                Bernoulli(sigmoid(teacher logit)): first-order terms plus pairwise
                       (FM) interactions of per-value latent vectors and the dense features;
                       teacher AUC ~0.80 and positive rate --positive-rate by default
  --drift X            the hot set moves by X of each feature's values per day

Same --seed, same bytes. Parts are generated in parallel as Ray tasks.

Output folder:
  parquet: day=N/part-XXXXX.parquet, manifest.json (written last), stats/ (id frequencies)
  tsv:     day_N (Criteo text: tab-separated, hex ids, empty = missing), {synthetic.SYNTHETIC_JSON};
           convert with `python -m jobs.prepare --input DIR/day_* --output OUT`
"""

EPILOG = """\
examples:
  python -m jobs.synth --rows 1000000 --days 2 --out data/synth
  python -m jobs.synth --rows 7000000 --days 7 --drift 0.01 --seed 3 --out data/drift
  python -m jobs.synth --rows 100000 --format tsv --out data/synth-tsv
  RAY_ADDRESS=http://127.0.0.1:8265 python -m jobs.synth --rows ... --out ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("python -m jobs.synth", DESCRIPTION, EPILOG)
    parser.add_argument("--rows", type=int, required=True, metavar="N",
                        help="total rows over all days")
    parser.add_argument("--days", type=int, default=1, metavar="D",
                        help="days (day=N folders); the last is halved into validation and "
                             "test; a single day is cut in 7 first (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--format", choices=(PARQUET_FORMAT, TSV_FORMAT), default=PARQUET_FORMAT,
                        help="Parquet shards or Criteo TSV (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=synthetic.DEFAULT_SCALE, metavar="S",
                        help="multiplies the Terabyte cardinalities (default: %(default)g)")
    parser.add_argument("--drift", type=float, default=0.0, metavar="X",
                        help="fraction of each feature's values the hot set moves per day "
                             "(default: %(default)g)")
    parser.add_argument("--seed", type=int, default=0, metavar="K",
                        help="random seed (default: %(default)s)")
    parser.add_argument("--positive-rate", type=float, default=0.25, metavar="P",
                        help="target fraction of positive labels (default: %(default)g)")
    parser.add_argument("--part-rows", type=int, default=synthetic.DEFAULT_PART_ROWS, metavar="N",
                        help="rows per Parquet file (default: %(default)s)")
    parser.add_argument("--no-stats", action="store_true",
                        help="skip the id frequency statistics (Parquet only)")
    add_task_flags(parser, "generate the parts")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = SynthConfig(
            rows=args.rows, days=args.days, scale=args.scale, drift=args.drift, seed=args.seed,
            positive_rate=args.positive_rate, part_rows=args.part_rows,
        )
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    with ray_for_tasks(args):
        manifest = synthetic.generate(config, out, args.format, use_ray=not args.no_ray,
                                      progress=not args.no_progress)
        stats_dir = None
        if args.format == PARQUET_FORMAT and not args.no_stats:
            from data_pipeline.stats import write_feature_stats

            stats_dir = write_feature_stats(out, use_ray=not args.no_ray)

    syn = manifest["synthetic"]
    auc = ", ".join(f"{s} {v:.4f}" for s, v in syn["teacher_auc"].items() if v is not None)
    files = sum(len(d["files"]) for d in manifest["days"].values())
    print(f"generated {manifest['rows']:,} rows over {config.days} day(s) in "
          f"{syn['seconds']:.1f} s; positive rate {syn['positive_rate']:.4f}; "
          f"teacher AUC {auc}")
    if args.format == PARQUET_FORMAT:
        print(f"shards:   {out}/day=N/part-XXXXX.parquet ({files} files)")
        print(f"manifest: {out / 'manifest.json'}")
        if stats_dir is not None:
            print(f"stats:    {stats_dir}")
    else:
        print(f"tsv:      {out}/day_N ({files} files)")
        print(f"manifest: {out / synthetic.SYNTHETIC_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
