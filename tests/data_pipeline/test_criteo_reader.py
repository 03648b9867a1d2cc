"""The Criteo TSV reader: real samples, every kind of bad line, line numbers, gzip, edge files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from data_pipeline.criteo import (
    LONG_LINE_MARKER,
    CriteoInputWarning,
    CriteoReader,
    NotCriteoError,
    read_criteo,
    sniff_layout,
)
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema


def make_line(index: int, label: int | str = 0, labelled: bool = True, **fields: str) -> str:
    """A valid Criteo line whose C1 is `index` in hex (so order and losses are checkable)."""
    values = {f"I{i}": str(i * 3 - 7) for i in range(1, 14)}
    values["I4"] = ""
    values.update({f"C{i}": f"{(i * 0x01000193) & 0xFFFFFFFF:08x}" for i in range(1, 27)})
    values["C1"] = f"{index:08x}"
    values["C7"] = ""
    values.update(fields)
    out = [str(label)] if labelled else []
    return "\t".join(out + [values[c] for c in (*DENSE_COLUMNS, *SPARSE_COLUMNS)])


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def c1_values(table: pa.Table) -> list[int]:
    return table.column("C1").to_pylist()


def test_good_lines_become_the_shard_schema(tmp_path):
    lines = [
        make_line(0, label=1),
        make_line(1, I1="-5", I2="007", C2="ffffffff", C3="0000000A"),
        make_line(2, I13="2147483647", I12="-2147483648", C26=""),
    ]
    table, stats, rejects = read_criteo(write(tmp_path, "a.tsv", "\n".join(lines) + "\n"))
    assert table.schema == arrow_schema(True)
    assert rejects == [] and stats.rows == 3 and stats.positives == 1 and stats.lines == 3
    rows = table.to_pylist()
    assert [r["label"] for r in rows] == [1, 0, 0]
    assert rows[0]["I1"] == -4 and rows[0]["I4"] is None and rows[0]["C7"] is None
    assert rows[1]["I1"] == -5 and rows[1]["I2"] == 7
    assert rows[1]["C2"] == 0xFFFFFFFF and rows[1]["C3"] == 10
    assert rows[2]["I13"] == 2**31 - 1 and rows[2]["I12"] == -(2**31) and rows[2]["C26"] is None
    assert c1_values(table) == [0, 1, 2]


def test_unlabelled_files_have_39_fields_and_no_label(tmp_path):
    lines = [make_line(i, labelled=False) for i in range(5)]
    path = write(tmp_path, "test.txt", "\n".join(lines) + "\n")
    assert sniff_layout(path) is False
    table, stats, rejects = read_criteo(path)
    assert table.schema == arrow_schema(False) and "label" not in table.schema.names
    assert stats.rows == 5 and stats.positives == 0 and rejects == []
    assert c1_values(table) == list(range(5))


GOOD = make_line(3)
BAD_LINES = {
    "one field": ("garbage", "wrong number of fields: 1, expected 40"),
    "extra trailing tab": (GOOD + "\t", "wrong number of fields: 41, expected 40"),
    "a field short": (GOOD.rsplit("\t", 1)[0], "wrong number of fields: 39, expected 40"),
    "non-numeric integer": (make_line(3, I3="abc"), "I3: not an integer"),
    "hex-looking integer": (make_line(3, I5="0x10"), "I5: not an integer"),
    "float integer": (make_line(3, I2="1.5"), "I2: not an integer"),
    "integer beyond int32": (make_line(3, I1="2147483648"), "I1: not an integer in int32"),
    "non-hex categorical": (make_line(3, C5="zzzzzzzz"), "C5: not a hex categorical"),
    "over-long categorical": (make_line(3, C9="123456789"), "C9: more than 8 hex digits"),
    "label 2": (make_line(3, label=2), "label: not 0 or 1: '2'"),
    "label missing": (make_line(3, label=""), "label: missing"),
    "label word": (make_line(3, label="yes"), "label: not 0 or 1"),
    "non-ascii categorical": (make_line(3, C2="caf\u00e9beef"), "C2: not a hex categorical"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_line_is_rejected_with_its_line_and_no_good_row_is_lost(tmp_path, kind):
    bad, reason = BAD_LINES[kind]
    # Blank lines before the bad one: its number must count them.
    text = "\n".join([make_line(0), "", make_line(1), "", bad, make_line(2), make_line(4)]) + "\n"
    path = write(tmp_path, "day_0", text)
    table, stats, rejects = read_criteo(path)
    assert [(r.file, r.line) for r in rejects] == [(str(path), 5)]
    assert reason in rejects[0].reason
    # Bytes outside ASCII show as "?" in the reject ("é" is two bytes in UTF-8).
    assert rejects[0].raw == bad.encode().translate(bytes(range(128)) + b"?" * 128).decode()
    assert stats.rejects == 1 and stats.blank_lines == 2 and stats.lines == 7
    assert c1_values(table) == [0, 1, 2, 4]


def test_line_numbers_stay_right_across_many_blocks(tmp_path):
    lines, expected, good = [], [], []
    for i in range(3000):
        if i % 97 == 5:
            lines.append(make_line(i) + "\t")  # wrong width, caught by the CSV parser
            expected.append(len(lines))
        elif i % 89 == 7:
            lines.append(make_line(i, I7="x"))  # right width, caught by validation
            expected.append(len(lines))
        elif i % 101 == 9:
            lines.append("")
        else:
            lines.append(make_line(i))
            good.append(i)
    # CRLF line ends and a block far smaller than the file: hundreds of batches.
    path = write(tmp_path, "big.tsv", "\r\n".join(lines) + "\r\n")
    seen = []
    reader = CriteoReader(path, block_size=4096, on_reject=seen.append)
    table = pa.Table.from_batches(list(reader), schema=reader.schema)
    assert [r.line for r in seen] == expected
    assert c1_values(table) == good
    assert reader.stats.rejects == len(expected) and reader.stats.lines == 3000
    for r in seen:
        assert r.raw == lines[r.line - 1]


def test_fast_and_slow_parsing_paths_agree(tmp_path):
    # One bad value sends its whole column down the row-by-row path; the good values in it
    # must parse exactly as they do on the fast path.
    good = [make_line(0, I2="0000000000012", C4="0000000a"), make_line(1, I2="-0", C4="a")]
    fast, _, _ = read_criteo(write(tmp_path, "fast.tsv", "\n".join(good[:1]) + "\n"))
    mixed = [*good, make_line(2, I2="1-2", C4="abcdefgh")]
    slow, _, rejects = read_criteo(write(tmp_path, "slow.tsv", "\n".join(mixed) + "\n"))
    assert fast.column("I2").to_pylist() == [12] and fast.column("C4").to_pylist() == [10]
    assert slow.column("I2").to_pylist() == [12, 0] and slow.column("C4").to_pylist() == [10, 10]
    assert [r.line for r in rejects] == [3]
    assert "I2: not an integer" in rejects[0].reason  # the first bad field is the one reported


@pytest.mark.parametrize("length", [200_000, 3_000_000])  # inside one block, across blocks
def test_a_line_longer_than_64k_is_one_reject(tmp_path, length):
    lines = [make_line(0), "x\t" * (length // 2), make_line(1), make_line(2, C3="")]
    table, stats, rejects = read_criteo(write(tmp_path, "long.tsv", "\n".join(lines) + "\n"))
    assert [r.line for r in rejects] == [2] and rejects[0].raw == LONG_LINE_MARKER.decode()
    assert rejects[0].reason == "line longer than 65536 bytes"
    assert c1_values(table) == [0, 1, 2] and stats.lines == 4


def test_a_file_of_wrong_width_lines_is_not_criteo(tmp_path):
    path = write(tmp_path, "sales.csv", "date,store,amount\n2024-01-01,3,19.99\n" * 50)
    with pytest.raises(NotCriteoError, match=r"sales\.csv: not a Criteo TSV file"):
        CriteoReader(path)


def test_a_file_of_header_like_junk_is_not_criteo(tmp_path):
    header = "\t".join(["label", *DENSE_COLUMNS, *SPARSE_COLUMNS])
    path = write(tmp_path, "junk.tsv", (header + "\n") * 5000)
    with pytest.raises(NotCriteoError, match=r"junk\.tsv: .*none of its first \d+ non-blank"):
        list(CriteoReader(path))


def test_one_header_line_before_good_rows_is_just_a_reject(tmp_path):
    header = "\t".join(["label", *DENSE_COLUMNS, *SPARSE_COLUMNS])
    text = "\n".join([header, make_line(0), make_line(1)]) + "\n"
    table, _, rejects = read_criteo(write(tmp_path, "h.tsv", text))
    assert [r.line for r in rejects] == [1] and rejects[0].reason.startswith("label:")
    assert c1_values(table) == [0, 1]


def test_empty_file_is_zero_rows_with_a_warning(tmp_path):
    path = write(tmp_path, "empty.tsv", b"")
    with pytest.warns(CriteoInputWarning, match="empty file"):
        table, stats, rejects = read_criteo(path)
    assert table.num_rows == 0 and table.schema == arrow_schema(True) and rejects == []
    assert stats.warnings and stats.lines == 0


def test_blank_lines_only_are_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, "blank.tsv", "\n\r\n\n\n")
    with pytest.warns(CriteoInputWarning, match="only blank lines"):
        table, stats, rejects = read_criteo(path)
    assert table.num_rows == 0 and rejects == []
    assert stats.blank_lines == 4 and stats.rejects == 0


def test_crlf_and_lf_files_read_the_same(tmp_path):
    lines = [make_line(i, label=i % 2) for i in range(50)]
    lf, _, _ = read_criteo(write(tmp_path, "lf.tsv", "\n".join(lines) + "\n"))
    crlf, _, rejects = read_criteo(write(tmp_path, "crlf.tsv", "\r\n".join(lines) + "\r\n"))
    assert rejects == [] and crlf.equals(lf)
    # The last field of a CRLF line must not keep the "\r".
    assert crlf.column("C26").to_pylist() == lf.column("C26").to_pylist()


def test_gzip_is_detected_by_content_and_reads_like_plain(tmp_path):
    text = "\n".join(make_line(i) for i in range(300)) + "\n"
    plain, _, _ = read_criteo(write(tmp_path, "day_0", text))
    packed, _, _ = read_criteo(write(tmp_path, "day_1", gzip.compress(text.encode())))
    two = gzip.compress(text.encode()) + gzip.compress(text.encode())  # concatenated members
    both, _, _ = read_criteo(write(tmp_path, "day_2.gz", two))
    assert packed.equals(plain) and both.num_rows == 600


def test_truncated_gzip_keeps_the_rows_before_the_cut(tmp_path):
    lines = [make_line(i) for i in range(4000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1)
    cut = data[: len(data) * 3 // 5]
    # What any decoder can recover from the cut bytes: that many complete lines.
    recoverable = zlib.decompressobj(wbits=31).decompress(cut)
    complete = recoverable.count(b"\n")
    path = write(tmp_path, "day_5.gz", cut)
    with pytest.warns(CriteoInputWarning, match="gzip stream ends early"):
        table, stats, rejects = read_criteo(path)
    assert stats.rows == complete > 0
    assert c1_values(table) == list(range(stats.rows))  # a prefix, nothing skipped
    assert rejects == []  # the partial line at the cut is dropped, not rejected
    assert stats.truncated is not None and "partial line" in stats.truncated


def test_real_samples_parse_with_known_values(real_data):
    kaggle, k_stats, _ = read_criteo(real_data / "criteo_kaggle_sample.tsv")
    assert (kaggle.num_rows, k_stats.rejects, k_stats.positives) == (13000, 0, 3116)
    row = kaggle.slice(4999, 1).to_pylist()[0]  # `sed -n 5000p`
    assert (row["label"], row["I1"], row["I2"], row["I12"], row["I13"]) == (1, 2, 22, None, 3)
    assert row["C1"] == 0x5A9ED9B0 and row["C19"] is None and row["C26"] is None
    assert row["C24"] == 0x590B856F

    tera, t_stats, _ = read_criteo(real_data / "criteo_terabyte_day0_sample.tsv")
    assert (tera.num_rows, t_stats.rejects, t_stats.positives) == (6000, 0, 155)
    row = tera.slice(4320, 1).to_pylist()[0]  # `sed -n 4321p`
    assert (row["label"], row["I1"], row["I4"], row["I12"], row["I13"]) == (0, 41, None, 19105, 10)
    assert row["C1"] == 0xAD98E872 and row["C26"] == 0xE1BE5EF2

    test, u_stats, _ = read_criteo(real_data / "criteo_kaggle_unlabeled_sample.tsv")
    assert test.num_rows == 4000 and u_stats.rejects == 0 and "label" not in test.schema.names
    row = test.slice(2999, 1).to_pylist()[0]  # `sed -n 3000p`
    assert (row["I1"], row["I5"], row["I12"], row["I13"]) == (0, 10229, None, 9)
    assert row["C1"] == 0x05DB9164 and row["C3"] is None and row["C26"] == 0xF8D62DB8


def test_real_sample_gzipped_equals_plain(real_data, tmp_path):
    source = real_data / "criteo_terabyte_day0_sample.tsv"
    packed = write(tmp_path, "day_0.gz", gzip.compress(source.read_bytes(), compresslevel=1))
    assert read_criteo(packed)[0].equals(read_criteo(source)[0])


def test_corrupt_gzip_keeps_the_rows_before_the_damage(tmp_path):
    data = bytearray(gzip.compress(
        ("\n".join(make_line(i) for i in range(4000)) + "\n").encode(), compresslevel=1))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # a run of zeros is not valid deflate data
    with pytest.warns(CriteoInputWarning, match="gzip stream"):
        table, stats, _ = read_criteo(write(tmp_path, "day_6.gz", bytes(data)))
    assert 0 < stats.rows < 4000 and stats.truncated is not None
    # Rows that decoded before the damage are kept in order; garbage after it is not parsed.
    assert c1_values(table)[: stats.rows // 2] == list(range(stats.rows // 2))


def test_a_fixed_layout_that_does_not_match_is_refused(tmp_path):
    path = write(tmp_path, "day_0", "\n".join(make_line(i) for i in range(3)) + "\n")
    with pytest.raises(NotCriteoError, match="none of its first 3 lines has 39 tab-separated"):
        CriteoReader(path, labelled=False)
    assert CriteoReader(path, labelled=True).labelled is True
