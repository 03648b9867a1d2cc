"""Request bodies → model inputs, without a server: the same numbers as the offline path.

The online path (JSON rows → pydantic → numpy hex decoding → `transform_dense`) must give
the model exactly the tensors the offline path (TSV reader → `transform_table`) gives it.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pydantic import ValidationError
from serving_helpers import raw_tsv_rows

from data_pipeline.criteo import read_criteo
from data_pipeline.schema import DENSE_COLUMNS, MISSING_ID, SPARSE_COLUMNS
from data_pipeline.transforms import transform_table
from services.features import decode_hex, model_inputs
from services.schemas import ScoreRequest, describe_errors, parse_score_request


def _named(row: dict) -> dict:
    named = dict(zip(DENSE_COLUMNS, row["dense"], strict=True))
    named.update(zip(SPARSE_COLUMNS, row["categorical"], strict=True))
    return {k: v for k, v in named.items() if v is not None}


@pytest.mark.parametrize("shape", ["arrays", "named"])
def test_request_rows_become_exactly_the_offline_inputs(criteo_samples, shape):
    tsv = criteo_samples / "criteo_kaggle_unlabeled_sample.tsv"
    rows = raw_tsv_rows(tsv)
    if shape == "named":
        rows = [_named(r) for r in rows]
    parsed = parse_score_request(json.dumps({"rows": rows}).encode())
    dense, sparse = model_inputs(parsed.rows)
    table, _, _ = read_criteo(tsv)
    offline = transform_table(table)
    assert dense.dtype == np.float32 and sparse.dtype == np.int64
    np.testing.assert_array_equal(dense, offline["dense"])
    np.testing.assert_array_equal(sparse, offline["sparse"])


def test_labelled_rows_too(criteo_samples):
    tsv = criteo_samples / "criteo_kaggle_sample.tsv"
    rows = raw_tsv_rows(tsv)[:2000]
    dense, sparse = model_inputs(parse_score_request(json.dumps({"rows": rows}).encode()).rows)
    table, _, _ = read_criteo(tsv)
    offline = transform_table(table.slice(0, 2000))
    np.testing.assert_array_equal(dense, offline["dense"])
    np.testing.assert_array_equal(sparse, offline["sparse"])


def test_hex_decoding_of_every_width_and_case():
    values = [None, "", "0", "f", "F00", "05db9164", "ffffffff", "FFFFFFFF", "0000000a", "abc"]
    assert decode_hex(values).tolist() == [int(v, 16) if v else MISSING_ID for v in values]
    rng = random.Random(0)
    eight = [rng.choice([None, f"{rng.getrandbits(32):08x}"]) for _ in range(5000)]
    mixed = [rng.choice([None, "", f"{rng.getrandbits(32):X}"[: rng.randint(1, 8)]])
             for _ in range(5000)]
    for values in (eight, mixed):  # the 8-digit fast path and the any-width path
        assert decode_hex(values).tolist() == [int(v, 16) if v else -1 for v in values]


def test_extreme_values_survive():
    row = {"dense": [2**31 - 1, -(2**31), 0, None] + [1] * 9,
           "categorical": ["ffffffff", "00000000", "", None] + ["1"] * 22}
    dense, sparse = model_inputs(parse_score_request(json.dumps({"rows": [row]}).encode()).rows)
    assert sparse[0, :4].tolist() == [2**32 - 1, 0, MISSING_ID, MISSING_ID]
    assert dense[0, 0] == np.log1p(np.float32(2**31 - 1)) and dense[0, 1] == 0
    assert dense[0, 3] == 0  # missing → 0, like training


def _errors(body: object) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ValidationError) as info:
        parse_score_request(raw)
    return describe_errors(info.value).model_dump()


GOOD = {"dense": [1] * 13, "categorical": ["05db9164"] * 26}


def test_messages_name_row_and_field():
    bad = dict(GOOD, categorical=["05db9164"] * 6 + ["xyz"] + ["05db9164"] * 19)
    out = _errors({"rows": [GOOD, GOOD, bad]})
    assert out["detail"] == "rows[2].categorical[6] (C7): not a hex value: 'xyz'"
    assert out["errors"][0] | {"msg": None} == {
        "row": 2, "field": "C7", "loc": "rows[2].categorical[6] (C7)", "msg": None,
        "type": "string_pattern_mismatch"}
    out = _errors({"rows": [GOOD, {"I4": 2**31}]})
    assert out["detail"].startswith("rows[1].I4: ") and out["errors"][0]["row"] == 1
    out = _errors({"rows": [{"C1": "123456789"}]})
    assert out["detail"] == "rows[0].C1: more than 8 hex digits: '123456789'"


def test_many_errors_are_counted_not_all_listed():
    out = _errors({"rows": [{"I1": "x"}] * 100})
    assert len(out["errors"]) == 20
    assert "99 more problems, 80 not listed" in out["detail"]


def test_both_parsers_agree_on_what_they_accept():
    # The array-first fast parser and ScoreRequest must accept and refuse the same bodies.
    bodies = [
        {"rows": [GOOD]}, {"rows": [{"I1": 3}]}, {"rows": [GOOD, {"C2": "ab"}]},
        {"rows": [{"dense": GOOD["dense"]}]}, {"rows": [dict(GOOD, I1=3)]},
        {"rows": [dict(GOOD, dense=[1] * 12)]}, {"rows": [GOOD], "extra": 1},
    ]
    for body in bodies:
        raw = json.dumps(body).encode()
        try:
            fast = parse_score_request(raw).rows
        except ValidationError:
            fast = None
        try:
            slow = ScoreRequest.model_validate_json(raw).rows
        except ValidationError:
            slow = None
        assert fast == slow, body


def test_non_json_and_wrong_shapes():
    assert _errors(b"\x00\xff not json")["detail"].startswith("body: Invalid JSON")
    assert _errors([GOOD])["detail"] == "body: Input should be an object"
    assert _errors({"rows": []})["detail"].startswith("rows: List should have at least 1")
    assert "a row is an object" in _errors({"rows": [[1, 2]]})["detail"]


def test_the_documented_examples_are_valid_requests():
    from services.schemas import REQUEST_EXAMPLES

    for name, example in REQUEST_EXAMPLES.items():
        rows = parse_score_request(json.dumps(example["value"]).encode()).rows
        dense, sparse = model_inputs(rows)
        assert dense.shape == (len(rows), 13) and sparse.shape == (len(rows), 26), name
