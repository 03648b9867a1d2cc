"""Loading pydantic job configs from YAML, with errors that name the offending field; and the
command-line flags that override a training or search config's data and run sections."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from jobs.ray_session import ensure_ray
from training.config import ConfigError, TrainConfig, format_validation_error
from training.run import LOG_LEVEL_ENV

__all__ = ["ConfigError", "add_override_arguments", "checked_config", "load_config",
           "override_sections"]

M = TypeVar("M", bound=BaseModel)
C = TypeVar("C", bound=TrainConfig)


def load_config(path: str | Path, model: type[M],
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> M:
    """The YAML file at `path` as a `model`, validated once, after `overrides` (section →
    fields, e.g. {"data": {"path": ...}}) are laid over the file's sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of fields, got {type(data).__name__}")
    for section, fields in (overrides or {}).items():
        data[section] = {**(data.get(section) or {}), **fields}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `override_sections` reads (and --num-cpus), shared by the train and tune jobs."""
    parser.add_argument("--data", type=Path, help="override data.path")
    parser.add_argument("--name", help="override run.name (the run or experiment folder)")
    parser.add_argument("--storage-path", type=Path, help="override run.storage_path")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this job")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray Train's INFO lines (resource requests, every "
                             "rank's reports, checkpoints); the same as EMBPRESS_LOG_LEVEL=INFO")


def override_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Section updates from the --data, --name and --storage-path flags, for `load_config`."""
    sections: dict[str, dict[str, Any]] = {}
    if args.data:
        sections["data"] = {"path": args.data}
    run = {k: v for k, v in (("name", args.name), ("storage_path", args.storage_path)) if v}
    if run:
        sections["run"] = run
    return sections


def checked_config(
    load_fn: Callable[[argparse.Namespace], C], args: argparse.Namespace
) -> C | None:
    """The job's config, or None after printing why it cannot run (a bad field, no data)."""
    try:
        config = load_fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not (Path(config.data.path) / "manifest.json").is_file():
        print(f"error: data.path {config.data.path} holds no finished dataset (manifest.json); "
              "run `python -m jobs.synth` or `python -m jobs.prepare` first", file=sys.stderr)
        return None
    return config


def config_on_ray(
    load_fn: Callable[[argparse.Namespace], C], args: argparse.Namespace
) -> C | None:
    """`checked_config`, then Ray joined or started with `--num-cpus`: how the train and tune
    jobs begin (the trials show on Ray's dashboard, and Ray Train needs its state API to free
    the workers of trials ASHA stops)."""
    if getattr(args, "verbose", False):
        # Read where the run starts its workers (`training.run.train_log_level`).
        os.environ[LOG_LEVEL_ENV] = "INFO"
    config = checked_config(load_fn, args)
    if config is not None:
        ensure_ray(args.num_cpus)
    return config


R = TypeVar("R")


def refused(action: Callable[[], R], *errors: type[Exception]) -> R | None:
    """`action()`, or None after printing why it cannot run (one `error:` line on stderr)
    when it raises one of `errors`: a config the cluster cannot run, a bad search space."""
    try:
        return action()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return None
