"""The search job's command line (the search itself: tests/training/test_search*.py)."""

from __future__ import annotations

from jobs.cli import COMMANDS
from jobs.tune import build_parser


def test_cli_lists_tune_and_help_explains_resume():
    assert COMMANDS["tune"][0] == "jobs.tune"
    text = build_parser().format_help()
    assert "--resume" in text and "pareto.png" in text and "best_model" in text
