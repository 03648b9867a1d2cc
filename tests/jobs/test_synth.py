"""`python -m jobs.synth`: help, Parquet with stats through Ray, TSV, and refused arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import shards
from data_pipeline.datasets import split_sizes
from data_pipeline.stats import load_feature_stats
from jobs.synth import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_help_explains_the_command():
    text = build_parser().format_help()
    for phrase in ("--rows", "--days", "--out", "--format", "--scale", "--drift", "--seed",
                   "--positive-rate", "teacher", "manifest.json", "day=N/part-XXXXX",
                   "RAY_ADDRESS", "39,980"):
        assert phrase in text, phrase
    run = subprocess.run([sys.executable, "-m", "jobs.synth", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Zipf" in run.stdout


def test_parquet_with_stats_through_ray(ray_cluster, tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["--rows", "21000", "--days", "3", "--out", str(out), "--seed", "4",
                 "--drift", "0.01", "--positive-rate", "0.2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"manifest: {out / 'manifest.json'}" in printed
    assert f"shards:   {out}/day=N/part-XXXXX.parquet" in printed
    assert "teacher AUC" in printed and f"stats:    {out / 'stats'}" in printed
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["rows"] == 21_000 and sorted(manifest["days"]) == ["0", "1", "2"]
    assert manifest["synthetic"]["params"]["drift"] == 0.01
    assert abs(manifest["synthetic"]["positive_rate"] - 0.2) < 0.02
    assert split_sizes(out) == {"train": 14_000, "validation": 3_500, "test": 3_500}
    assert load_feature_stats(out).rows == 14_000


def test_tsv_without_ray(tmp_path, capsys):
    out = tmp_path / "tsv"
    assert main(["--rows", "3000", "--out", str(out), "--format", "tsv", "--no-ray",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"manifest: {out / 'synthetic.json'}" in printed
    assert len((out / "day_0").read_text().splitlines()) == 3000
    assert not (out / "stats").exists()


@pytest.mark.parametrize("args", [["--rows", "0"], ["--rows", "10", "--scale", "2"],
                                  ["--rows", "10", "--format", "csv"]])
def test_bad_arguments_exit_with_usage(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "x"), "--no-ray"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
