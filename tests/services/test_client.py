"""What the scoring client sends, without a server: the file's values, in order, in chunks.

Rows come from the real Criteo samples where present, else from the synthetic generator in
the same format (tests/services/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from data_pipeline.criteo import CriteoReader, read_criteo
from services.client import request_rows, table_chunks


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
    rows = request_rows(table)
    assert all(len(r["dense"]) == 13 and len(r["categorical"]) == 26 for r in rows)
    assert all(v is None or len(v) == 8 for r in rows for v in r["categorical"])
    sent = [(r["dense"], [int(v, 16) if v else None for v in r["categorical"]]) for r in rows]
    assert sent == _text_rows(tsv)


def test_chunks_keep_order_and_size(criteo_samples):
    reader = CriteoReader(criteo_samples / "criteo_kaggle_unlabeled_sample.tsv", block_size=1 << 16)
    chunks = list(table_chunks(reader, 300))
    assert [c.num_rows for c in chunks] == [300] * 13 + [100]
    whole, _, _ = read_criteo(criteo_samples / "criteo_kaggle_unlabeled_sample.tsv")
    assert pa.concat_tables(chunks).equals(whole)
