"""The compression-quality benchmark: one table from one script, resumable cell by cell."""

from __future__ import annotations

import json

import pytest

from jobs.benchmarks import compression_quality


@pytest.mark.slow
def test_cells_are_written_once_and_skipped_when_run_again(synth_data, ray_cluster, tmp_path,
                                                           capsys):
    args = ["--out", str(tmp_path), "--data", str(synth_data), "--methods", "hash", "qr",
            "--ratios", "10", "--max-steps", "3", "--two-stage", "lowrank",
            "--two-stage-ratios", "3"]
    assert compression_quality.main([*args, "--int8"]) == 0
    lines = (tmp_path / compression_quality.RESULTS).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["cell"] for r in rows] == ["uncompressed", "hash@10x/frequency",
                                         "qr@10x/frequency",
                                         "lowrank@3x/from uncompressed",
                                         "lowrank@10x/from uncompressed"]
    for r in rows:
        assert 0.5 < r["validation_auc"] < 1 and r["samples"] == 3 * 4096
        # The served fp32 model scores as trained; int8 tables cost little.
        assert abs(r["served_fp32_auc"] - r["validation_auc"]) < 1e-4
        assert abs(r["served_int8_auc"] - r["served_fp32_auc"]) < 0.01
    # Compressed cells hold fewer serving bytes than the uncompressed one; low-rank's are
    # built from it (k = d/3, then d/10: fewer still).
    assert rows[1]["serving_bytes"] < rows[0]["serving_bytes"]
    assert rows[4]["serving_bytes"] < rows[3]["serving_bytes"] < rows[0]["serving_bytes"]
    out = capsys.readouterr().out
    assert "teacher" in out and "hash" in out and "gap" in out
    assert not (tmp_path / "runs" / "uncompressed").exists()  # run folders are cleaned up

    # A second run trains nothing new: every cell is already in results.jsonl.
    assert compression_quality.main([*args, "--methods", "hash"]) == 0
    assert (tmp_path / compression_quality.RESULTS).read_text().splitlines() == lines
    assert "cell 1/" not in capsys.readouterr().out
