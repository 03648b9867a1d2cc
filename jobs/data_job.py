"""What the data jobs (`prepare`, `synth`) share: the shape of their command line and the Ray
instance their tasks run on, so both read and behave alike."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from jobs.ray_session import connect_or_start


def job_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A job's parser: `description` and `epilog` printed as written (they hold tables)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_task_flags(parser: argparse.ArgumentParser, work: str) -> None:
    """--num-cpus, --no-ray and --no-progress of a job that spreads `work` ("convert the
    files") over Ray tasks."""
    parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                        help="CPUs of the local Ray instance this command starts "
                             "(default: all); ignored when joining a cluster via RAY_ADDRESS")
    parser.add_argument("--no-ray", action="store_true",
                        help=f"{work} one after the other in this process")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@contextmanager
def ray_for_tasks(args: argparse.Namespace) -> Iterator[None]:
    """Ray for the job's tasks (RAY_ADDRESS's cluster, or a local instance shut down on the
    way out), unless --no-ray."""
    started = False if args.no_ray else connect_or_start(args.num_cpus, dashboard=False)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
