"""`python -m jobs.score` without a server: how it fails.

What it sends is tested in tests/services/test_client.py; its run against a real service
(4,000 rows, labelled input with rejects, a missing token) in
tests/services/test_scoring_service.py, which has the service running. Rows come from the
real Criteo samples where present, else from the synthetic generator in the same format.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from data_pipeline.synthetic import SynthConfig, write_tsv_day
from jobs import score


@pytest.fixture(scope="module")
def criteo_samples(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real samples (required in CI), else 4,000 synthetic rows with and without label."""
    try:
        return request.getfixturevalue("real_data")
    except pytest.skip.Exception:
        out = tmp_path_factory.mktemp("synthetic-samples")
        write_tsv_day(SynthConfig(rows=4000, seed=7), str(out), 0)
        lines = (out / "day_0").read_text().splitlines()
        (out / "criteo_kaggle_sample.tsv").write_text("\n".join(lines) + "\n")
        (out / "criteo_kaggle_unlabeled_sample.tsv").write_text(
            "".join(line.partition("\t")[2] + "\n" for line in lines))
        return out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on return: nothing listens there


def test_unreachable_service_is_a_clear_error(criteo_samples, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    code = score.main(["--url", url, "--input",
                       str(criteo_samples / "criteo_kaggle_unlabeled_sample.tsv"), "--no-progress"])
    assert code == 1
    assert f"cannot reach {url}/readyz" in capsys.readouterr().err


def test_input_errors(tmp_path, capsys):
    assert score.main(["--url", "http://x", "--input", str(tmp_path / "nope.tsv")]) == 2
    assert "no such input file" in capsys.readouterr().err
    junk = tmp_path / "junk.tsv"
    junk.write_text("hello\tworld\n" * 10)
    assert score.main(["--url", "http://x", "--input", str(junk)]) == 2
    assert "not a Criteo TSV file" in capsys.readouterr().err
    assert score.main(["--url", "http://x", "--input", str(junk), "--batch-size", "0"]) == 2
