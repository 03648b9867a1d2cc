"""The scoring client's side of things, without a server: what it sends and how it fails.

Its run against a real service (4,000 rows, labelled input with rejects, a missing token)
is in tests/services/test_scoring_service.py, which has the service running. Rows come from
the real Criteo samples where present, else from the synthetic generator in the same format.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pytest

from data_pipeline.criteo import CriteoReader, read_criteo
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


def _text_rows(tsv: Path) -> list[tuple[list, list]]:
    out = []
    for line in tsv.read_text().splitlines():
        fields = line.split("\t")[-39:]
        out.append(([int(v) if v else None for v in fields[:13]],
                    [int(v, 16) if v else None for v in fields[13:]]))
    return out


@pytest.mark.parametrize("name", ["criteo_kaggle_unlabeled_sample.tsv",
                                  "criteo_kaggle_sample.tsv"])
def test_request_rows_carry_the_file_values(criteo_samples, name):
    tsv = criteo_samples / name
    table, _, rejects = read_criteo(tsv)
    assert not rejects
    rows = score.request_rows(table)
    assert all(len(r["dense"]) == 13 and len(r["categorical"]) == 26 for r in rows)
    assert all(v is None or len(v) == 8 for r in rows for v in r["categorical"])
    sent = [(r["dense"], [int(v, 16) if v else None for v in r["categorical"]]) for r in rows]
    assert sent == _text_rows(tsv)


def test_chunks_keep_order_and_size(criteo_samples):
    reader = CriteoReader(criteo_samples / "criteo_kaggle_unlabeled_sample.tsv", block_size=1 << 16)
    chunks = list(score._chunks(reader, 300))
    assert [c.num_rows for c in chunks] == [300] * 13 + [100]
    whole, _, _ = read_criteo(criteo_samples / "criteo_kaggle_unlabeled_sample.tsv")
    assert pa.concat_tables(chunks).equals(whole)


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
