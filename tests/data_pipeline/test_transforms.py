import numpy as np
import pyarrow as pa

from data_pipeline.schema import MISSING_ID, arrow_schema
from data_pipeline.transforms import transform_dense, transform_table


def test_dense_transform_missing_negative_log1p():
    x = np.array([np.nan, -3, 0, 1, 1000], dtype=np.float64)
    out = transform_dense(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0, np.log1p(1), np.log1p(1000)], rtol=1e-6)


def test_table_transform_fills_nulls_and_keeps_raw_ids():
    schema = arrow_schema()
    cols = {f.name: [None, None] for f in schema}
    cols["label"] = [1, 0]
    cols["I1"] = [5, None]
    cols["I2"] = [-2, 7]
    cols["C1"] = [0xDEADBEEF, None]
    table = pa.table(cols, schema=schema)
    out = transform_table(table)
    assert out["dense"].shape == (2, 13) and out["sparse"].shape == (2, 26)
    np.testing.assert_allclose(out["dense"][:, 0], [np.log1p(5), 0], rtol=1e-6)
    np.testing.assert_allclose(out["dense"][:, 1], [0, np.log1p(7)], rtol=1e-6)
    assert out["sparse"][0, 0] == 0xDEADBEEF and out["sparse"][1, 0] == MISSING_ID
    assert (out["sparse"][:, 1:] == MISSING_ID).all()
    np.testing.assert_array_equal(out["label"], [1.0, 0.0])
