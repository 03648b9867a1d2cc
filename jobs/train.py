"""`python -m jobs.train --config deploy/configs/<name>.yaml`: train on Ray Train, then export.

The command around `training.run.run`: it loads the config (with the command line's
overrides), joins or starts Ray, and prints the result. The plan (every feature's method,
where each lives across the workers) is printed by the run itself. Running again with the
same run name resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.config import (
    add_override_arguments,
    config_on_ray,
    load_config,
    override_sections,
    refused,
)
from training.config import TrainConfig
from training.preflight import ResourcesUnavailable
from training.run import run
from training.stall import TrainingStalled
from training.summary import format_summary, train_summary, write_summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train a CTR model with compressed embeddings on Ray Train, evaluate it "
        "(AUC overall and per id-frequency band), checkpoint it, and export the collapsed "
        "serving model. Running again with the same run.name resumes from the latest "
        "checkpoint.",
    )
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML training config (see deploy/configs/)")
    add_override_arguments(parser)
    parser.add_argument("--export", type=Path, help="override export.out")
    return parser


def load(args: argparse.Namespace) -> TrainConfig:
    sections = override_sections(args)
    if args.export:
        sections["export"] = {"out": args.export}
    return load_config(args.config, TrainConfig, sections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_on_ray(load, args)
    if config is None:
        return 2
    result = refused(lambda: run(config), ResourcesUnavailable, TrainingStalled)
    if result is None:
        return 2
    summary = train_summary(config, result)
    print(format_summary(summary, write_summary(config, summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
