"""`python -m jobs.prepare` on the real Criteo samples: counts, known rows, help, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from data_pipeline import shards
from jobs.prepare import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def read_day(out: Path, day: int):
    return pq.ParquetDataset(shards.day_dir(out, day)).read()


def test_help_explains_the_command():
    text = build_parser().format_help()
    for phrase in ("--input", "--output", "--rows-per-shard", "--num-cpus", "day=N/part-XXXXX",
                   "manifest.json", "_rejects/day=N.jsonl", "RAY_ADDRESS"):
        assert phrase in text
    run = subprocess.run([sys.executable, "-m", "jobs.prepare", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Criteo" in run.stdout


def test_real_samples_convert_with_exact_counts(ray_cluster, real_data, tmp_path, capsys):
    out = tmp_path / "criteo"
    code = main([
        "--input", str(real_data / "criteo_terabyte_day0_sample.tsv"),
        str(real_data / "criteo_kaggle_sample.tsv"),
        "--output", str(out), "--no-progress",
    ])
    assert code == 0
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["rejects"] == 0 and manifest["labelled"] is True
    assert {d: v["rows"] for d, v in manifest["days"].items()} == {"0": 6000, "1": 13000}
    assert {d: v["positives"] for d, v in manifest["days"].items()} == {"0": 155, "1": 3116}
    assert manifest["schema_version"] == shards_schema_version()
    for entry in manifest["inputs"]:
        assert entry["sha256"] == shards.sha256_file(Path(entry["path"]))
    tera, kaggle = read_day(out, 0), read_day(out, 1)
    assert (tera.num_rows, kaggle.num_rows) == (6000, 13000)
    row = tera.slice(4320, 1).to_pylist()[0]  # `sed -n 4321p criteo_terabyte_day0_sample.tsv`
    assert (row["label"], row["I2"], row["I4"], row["C1"], row["C26"]) == (
        0, 429, None, 0xAD98E872, 0xE1BE5EF2)
    row = kaggle.slice(4999, 1).to_pylist()[0]  # `sed -n 5000p criteo_kaggle_sample.tsv`
    assert (row["label"], row["I1"], row["I13"], row["C2"], row["C26"]) == (
        1, 2, 3, 0xC41A84C8, None)
    printed = capsys.readouterr().out
    assert str(out / shards.MANIFEST) in printed and "6,000 rows" in printed
    # The job ends with its result block, and the same as JSON beside the shards.
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["rejected"]) == (19000, 0)
    assert summary["rejects"] == str(out / "_rejects")
    block = printed[printed.index("=== prepare: result ==="):]
    assert "rows kept       19,000 (3,271 positives)" in block
    assert f"rows rejected   0, each with its file and line in {out / '_rejects'}" in block


def test_unlabelled_sample_converts_without_a_label(ray_cluster, real_data, tmp_path):
    out = tmp_path / "scoring"
    assert main(["--input", str(real_data / "criteo_kaggle_unlabeled_sample.tsv"),
                 "--output", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["labelled"] is False and manifest["rows"] == 4000
    assert manifest["rejects"] == 0 and "label" not in manifest["columns"]
    table = read_day(out, 0)
    assert table.num_rows == 4000 and "label" not in table.schema.names
    assert len(table.schema.names) == 39
    row = table.slice(2999, 1).to_pylist()[0]  # `sed -n 3000p`
    assert (row["I1"], row["I5"], row["C1"], row["C3"]) == (0, 10229, 0x05DB9164, None)


def test_a_file_that_is_not_criteo_fails_with_its_name(ray_cluster, tmp_path, capsys):
    junk = tmp_path / "notes.md"
    junk.write_text("# notes\nnothing tab separated here\n")
    code = main(["--input", str(junk), "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "notes.md: not a Criteo TSV file" in capsys.readouterr().err
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


def test_rerun_without_ray_skips_what_is_converted(real_data, tmp_path, capsys):
    args = ["--input", str(real_data / "criteo_kaggle_unlabeled_sample.tsv"), "--output",
            str(tmp_path / "out"), "--rows-per-shard", "1500", "--no-ray", "--no-progress"]
    assert main(args) == 0
    first = sorted((tmp_path / "out" / "day=0").iterdir())
    assert [pq.read_metadata(p).num_rows for p in first] == [1500, 1500, 1000]
    assert "(converted)" in capsys.readouterr().out
    assert main(args) == 0
    assert "already converted, skipped" in capsys.readouterr().out


def shards_schema_version() -> int:
    from data_pipeline.schema import SCHEMA_VERSION

    return SCHEMA_VERSION
