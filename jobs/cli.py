"""The `embpress` command: one subcommand per job, each the same code as `python -m jobs.<name>`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (module, one-line help). Modules expose build_parser() and main(argv).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("jobs.synth", "generate synthetic Criteo data with a planted teacher model"),
    "prepare": ("jobs.prepare", "convert Criteo TSV (plain or .gz) into Parquet shards"),
    "train": ("jobs.train", "train on Ray Train with compressed embeddings, then export"),
    "tune": ("jobs.tune", "search compression settings on Ray Tune: the AUC/bytes Pareto front"),
    "export": ("jobs.export", "re-export a trained model, e.g. with quantised tables"),
    "serve": ("jobs.serve", "host an exported model on Ray Serve behind a REST endpoint"),
    "score": ("jobs.score", "score a Criteo TSV file against a running scoring endpoint"),
    "demo": ("jobs.demo", "run the whole product end to end on embedded defaults"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embpress",
        description="Train CTR models with compressed embeddings on Ray, and serve them.",
        epilog="Each command also runs as `python -m jobs.<command>` (e.g. under ray job submit).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
