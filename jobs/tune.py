"""`python -m jobs.tune --config deploy/configs/tune_<name>.yaml`: the best model in B bytes.

Ray Tune searches compression method, ratio, width, MLET, learning rates and export
quantisation; every trial is the training run itself, reporting to Tune (`training.search`
holds the search: trial, driver and results). The experiment folder gets the Pareto front
(CSV, Markdown, PNG), every trial's TensorBoard curves, and the best model under the
budget in the serving format. `--resume` continues an interrupted search without re-running
the trials that finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.config import (
    ConfigError,
    add_override_arguments,
    config_on_ray,
    load_config,
    override_sections,
    refused,
)
from training.preflight import ResourcesUnavailable, check_schedulable
from training.search import pareto
from training.search.config import TuneConfig
from training.search.driver import run_search
from training.search.results import FRONT_COLUMNS, SearchResult

EXIT_INTERRUPTED = 130  # the shell's code for a run ended by SIGINT


DESCRIPTION = (
    "Search compression settings with Ray Tune for the best validation AUC per serving byte: "
    "method (hash, qr, cafe, learned_hash, each with or without MLET), compression ratio, "
    "embedding width, learning rates and export quantisation. Each trial is a training run "
    "(jobs.train) on Ray Train; Optuna proposes trials for two objectives (AUC up, bytes "
    "down) or for AUC under objective.max_serving_bytes, and weak trials stop early at "
    "ASHA's rungs (in a Pareto search: those dominated there)."
)
EPILOG = (
    "Results in <run.storage_path>/<run.name>/: pareto.csv, pareto.md, pareto.png (every "
    "trial a point, the front a line, the budget a vertical line), trials.csv, best_model/ "
    "(the best finished trial under the budget, in the serving format), summary.json, and "
    "one trial_<id>/ folder per trial with its TensorBoard events (`tensorboard --logdir "
    "<experiment>`), its Ray Train run and its model. The config holds the training job's "
    "sections (data, model, schedule, scaling, run, ...) plus search, objective, asha and "
    "trials; training/search/config.py documents every field. On a cluster: ray job submit "
    "--working-dir . -- python -m jobs.tune --config ..."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=DESCRIPTION,
                                     epilog=EPILOG)
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML search config (see deploy/configs/tune_small.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted search in the experiment folder; "
                        "finished trials are not run again")
    add_override_arguments(parser)
    parser.add_argument("--num-samples", type=int, help="override trials.num_samples")
    return parser


def load(args: argparse.Namespace) -> TuneConfig:
    trials = {"trials": {"num_samples": args.num_samples}} if args.num_samples else {}
    return load_config(args.config, TuneConfig, {**override_sections(args), **trials})


FRONT_ROWS_SHOWN = 10


def print_result(result: SearchResult, config_path: Path) -> None:
    """The search's result block: the front's best rows, the best model under the budget,
    where the files are (the same as summary.json in the experiment folder)."""
    print("=== tune: result ===")
    # The front runs from the smallest model to the best AUC; its best-AUC end is what a
    # reader looks for first, the CSV holds every row.
    top = sorted(result.front, key=lambda r: -r["validation_auc"])[:FRONT_ROWS_SHOWN]
    print(pareto.markdown_table(top, FRONT_COLUMNS), end="")
    if len(result.front) > len(top):
        print(f"({len(result.front) - len(top)} more on the front in pareto.csv)")
    if not result.complete:
        print(f"the search was interrupted; continue it with: python -m jobs.tune "
              f"--config {config_path} --resume")
    if result.best is not None:
        print(f"best under the budget  trial {result.best['trial']}, validation AUC "
              f"{result.best['validation_auc']:.4f}, {result.best['serving_bytes']:,} bytes"
              f" → {result.files['best_model']}")
    else:
        print("best under the budget  none: no finished trial fits the budget")
    print(f"front           {result.files['pareto_csv']}  (table: {result.files['pareto_md']})")
    print(f"plot            {result.files['pareto_png']}")
    print(f"curves          tensorboard --logdir {result.experiment_dir}")
    print(f"this summary    {result.files['summary']}", flush=True)


def _search(config: TuneConfig, resume: bool) -> SearchResult:
    # Every trial's worker group, after its driver, must fit the cluster: said once here,
    # before any trial.
    check_schedulable(config.scaling, driver_cpus=config.trials.driver_cpus)
    return run_search(config, resume=resume)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_on_ray(load, args)
    if config is None:
        return 2
    result = refused(lambda: _search(config, args.resume), ConfigError, ResourcesUnavailable)
    if result is None:
        return 2
    print_result(result, args.config)
    return 0 if result.complete else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
