"""TSV → Parquet shard conversion: layout, manifest, rejects, re-runs, interruptions, Ray tasks."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline import shards
from data_pipeline.convert import (
    convert,
    convert_file,
    done_marker_path,
    plan_inputs,
    rejects_path,
)
from data_pipeline.criteo import CriteoInputWarning, NotCriteoError
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema

REPO = Path(__file__).resolve().parents[2]


def make_line(index: int, label: int = 0, **fields: str) -> str:
    values = {f"I{i}": str(i) for i in range(1, 14)}
    values.update({f"C{i}": f"{(i * 7919 + index) & 0xFFFFFFFF:08x}" for i in range(1, 27)})
    values["C1"] = f"{index:08x}"
    values.update(fields)
    return "\t".join([str(label)] + [values[c] for c in (*DENSE_COLUMNS, *SPARSE_COLUMNS)])


def tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("day=*/*"))}


def read_day(out: Path, day: int):
    return pq.ParquetDataset(shards.day_dir(out, day)).read()


def test_days_come_from_day_n_names_else_the_input_position(tmp_path):
    names = ("day_5.gz", "train.txt", "day_10.tsv.gz", "x.tsv", "my_day_9.tsv")
    for name in names:
        (tmp_path / name).write_text("")
    plans = plan_inputs([tmp_path / n for n in names])
    assert [p.day for p in plans] == [5, 1, 10, 3, 4]


def test_clashing_days_and_missing_inputs_are_refused(tmp_path):
    for name in ("a.tsv", "day_1"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match=r"share a day folder \(day=1: .*day_1, .*a\.tsv\)"):
        plan_inputs([tmp_path / "day_1", tmp_path / "a.tsv"])
    with pytest.raises(ValueError, match="listed twice"):
        plan_inputs([tmp_path / "a.tsv", tmp_path / "." / "a.tsv"])
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv"):
        plan_inputs([tmp_path / "nope.tsv"])


def test_convert_file_writes_shards_rejects_and_marker(tmp_path):
    lines = [make_line(i, label=int(i % 3 == 0)) for i in range(25)]
    lines[4] = "oops"
    lines[10] = make_line(10, C3="not-hex!")
    src = tsv(tmp_path / "day_2", lines)
    out = tmp_path / "out"
    entry = convert_file(src, out, 2, rows_per_shard=10)
    assert entry["rows"] == 23 and entry["rejects"] == 2 and not entry["skipped"]
    assert entry["positives"] == sum(1 for i in range(25) if i % 3 == 0 and i not in (4, 10))
    assert [f["rows"] for f in entry["files"]] == [10, 10, 3]
    assert [f["path"] for f in entry["files"]] == [
        f"day=2/part-{k:05d}.parquet" for k in range(3)]
    for f in entry["files"]:
        assert shards.sha256_file(out / f["path"]) == f["sha256"]
        assert pq.read_schema(out / f["path"]).equals(arrow_schema(True))
    table = read_day(out, 2)
    assert table.column("C1").to_pylist() == [i for i in range(25) if i not in (4, 10)]
    rejected = [json.loads(x) for x in rejects_path(out, 2).read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejected] == [(str(src), 5), (str(src), 11)]
    assert rejected[0]["raw"] == "oops" and rejected[1]["raw"] == lines[10]
    assert "C3: not a hex categorical" in rejected[1]["reason"]
    marker = json.loads(done_marker_path(out, 2).read_text())
    assert marker["sha256"] == shards.sha256_file(src) and marker["files"] == entry["files"]


def test_rerun_skips_converted_inputs_and_shards_are_byte_identical(tmp_path):
    a = tsv(tmp_path / "day_0", [make_line(i) for i in range(30)])
    b = tsv(tmp_path / "day_1", [make_line(i, label=1) for i in range(5)])
    out, again = tmp_path / "out", tmp_path / "again"
    first = convert([a, b], out, rows_per_shard=8, use_ray=False, progress=False)
    before = shard_bytes(out)
    mtimes = {p: (out / p).stat().st_mtime_ns for p in before}
    second = convert([a, b], out, rows_per_shard=8, use_ray=False, progress=False)
    assert [e["skipped"] for e in second["inputs"]] == [True, True]
    assert {p: (out / p).stat().st_mtime_ns for p in before} == mtimes
    convert([a, b], again, rows_per_shard=8, use_ray=False, progress=False)
    assert shard_bytes(again) == before  # a fresh conversion writes the same bytes
    assert (first["rows"], first["days"]["0"]["rows"], first["days"]["1"]["rows"]) == (35, 30, 5)
    # A changed input is converted again, and its day loses the shards it no longer has.
    tsv(a, [make_line(i) for i in range(3)])
    third = convert([a, b], out, rows_per_shard=8, use_ray=False, progress=False)
    assert [e["skipped"] for e in third["inputs"]] == [False, True]
    assert sorted(p.name for p in (out / "day=0").iterdir()) == ["part-00000.parquet"]
    assert third["rows"] == 8
    # Dropping an input leaves its day folder out of the manifest, and says so.
    with pytest.warns(CriteoInputWarning, match=r"day=1 are from an earlier conversion"):
        fourth = convert([a], out, rows_per_shard=8, use_ray=False, progress=False)
    assert list(fourth["days"]) == ["0"]


def test_an_interrupted_conversion_is_completed_by_the_rerun(tmp_path):
    a = tsv(tmp_path / "day_0", [make_line(i) for i in range(40)])
    b = tsv(tmp_path / "day_1", [make_line(i) for i in range(40)])
    out, clean = tmp_path / "out", tmp_path / "clean"
    convert([a, b], clean, rows_per_shard=16, use_ray=False, progress=False)
    convert([a, b], out, rows_per_shard=16, use_ray=False, progress=False)
    # What a kill during day 1's second shard leaves: no manifest, no marker for the day, its
    # first shard complete, the second one only under its temporary name.
    (out / shards.MANIFEST).unlink()
    done_marker_path(out, 1).unlink()
    (out / "day=1" / "part-00001.parquet").unlink()
    (out / "day=1" / "part-00002.parquet").unlink()
    leftover = out / "day=1" / ".part-00001.parquet.tmp-99999"
    leftover.write_bytes(b"PAR1 half a file")
    manifest = convert([a, b], out, rows_per_shard=16, use_ray=False, progress=False)
    assert [e["skipped"] for e in manifest["inputs"]] == [True, False]
    assert not leftover.exists() and (out / shards.MANIFEST).is_file()
    assert shard_bytes(out) == shard_bytes(clean)


def test_a_killed_conversion_leaves_no_complete_looking_output(tmp_path):
    block = "".join(make_line(i) + "\n" for i in range(2000)).encode()
    src = tmp_path / "day_0"
    src.write_bytes(block * 80)  # 160,000 rows, about 40 MB
    out, clean = tmp_path / "out", tmp_path / "clean"
    code = (
        "import sys; from data_pipeline.convert import convert; "
        "convert([sys.argv[1]], sys.argv[2], rows_per_shard=10000, use_ray=False, "
        "progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)], cwd=REPO)
    first = out / "day=0" / "part-00000.parquet"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the conversion ended before a shard appeared"
    assert not (out / shards.MANIFEST).exists() and not done_marker_path(out, 0).exists()
    for part in (out / "day=0").glob("part-*.parquet"):  # whatever has its final name is whole
        assert pq.read_metadata(part).num_rows == 10000
    manifest = convert([src], out, rows_per_shard=10000, use_ray=False, progress=False)
    assert manifest["rows"] == 160_000 and not manifest["inputs"][0]["skipped"]
    assert not list((out / "day=0").glob(".*"))
    convert([src], clean, rows_per_shard=10000, use_ray=False, progress=False)
    assert shard_bytes(out) == shard_bytes(clean)


def test_empty_file_gives_one_empty_shard_and_a_warning(tmp_path):
    src = tmp_path / "empty.tsv"
    src.write_bytes(b"")
    with pytest.warns(CriteoInputWarning, match="empty file"):
        manifest = convert([src], tmp_path / "out", use_ray=False, progress=False)
    assert manifest["rows"] == 0 and manifest["days"]["0"]["files"][0]["rows"] == 0
    assert manifest["warnings"] == [f"{src}: empty file, converted to zero rows"]
    assert read_day(tmp_path / "out", 0).schema.equals(arrow_schema(True))


def test_mixed_labelled_and_unlabelled_inputs_are_refused(tmp_path):
    a = tsv(tmp_path / "a.tsv", [make_line(0)])
    b = tsv(tmp_path / "b.tsv", [make_line(0).split("\t", 1)[1]])
    with pytest.raises(ValueError, match="mix labelled and unlabelled"):
        convert([a, b], tmp_path / "out", use_ray=False, progress=False)


def test_many_files_convert_as_ray_tasks(ray_cluster, tmp_path):
    good = tsv(tmp_path / "day_0", [make_line(i) for i in range(50)])
    bad = [make_line(i) for i in range(50)]
    bad[7] = make_line(7, label=2)
    bad[20] = make_line(20) + "\t"
    with_rejects = tsv(tmp_path / "day_1", bad)
    text = "\n".join(make_line(i) for i in range(3000)) + "\n"
    cut = tmp_path / "day_2.gz"
    packed = gzip.compress(text.encode())
    cut.write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "out"
    with pytest.warns(CriteoInputWarning, match="day_2.gz: gzip stream ends early"):
        manifest = convert([good, with_rejects, cut], out, rows_per_shard=20, progress=False)
    assert [manifest["days"][d]["rows"] for d in "01"] == [50, 48]
    assert manifest["rejects"] == 2 and manifest["truncated"] == [str(cut)]
    assert 0 < manifest["days"]["2"]["rows"] < 3000
    assert read_day(out, 1).column("C1").to_pylist() == [i for i in range(50) if i not in (7, 20)]
    rejected = [json.loads(x)["line"] for x in rejects_path(out, 1).read_text().splitlines()]
    assert rejected == [8, 21]
    on_disk = json.loads((out / shards.MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))


def test_a_non_criteo_file_fails_the_run_with_its_name(ray_cluster, tmp_path):
    good = tsv(tmp_path / "day_0", [make_line(i) for i in range(10)])
    header = "\t".join(["label", *DENSE_COLUMNS, *SPARSE_COLUMNS])
    junk = tsv(tmp_path / "headers.tsv", [header] * 20)
    with pytest.raises(NotCriteoError, match=r"headers\.tsv: not a Criteo TSV file"):
        convert([good, junk], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / shards.MANIFEST).exists()
    words = tsv(tmp_path / "words.txt", ["hello world"] * 10)
    with pytest.raises(NotCriteoError, match=r"words\.txt: .*39 or 40 tab-separated fields"):
        convert([good, words], tmp_path / "out2", progress=False)


def test_streamed_shards_are_the_bytes_write_table_atomic_gives(tmp_path):
    # 140,000 rows: a shard of two row groups (131,072 + 8,928), written group by group.
    block = "".join(make_line(i, label=i % 2) + "\n" for i in range(1000)).encode()
    src = tmp_path / "day_0"
    src.write_bytes(block * 140)
    entry = convert_file(src, tmp_path / "out", 0, rows_per_shard=200_000)
    shard = tmp_path / "out" / entry["files"][0]["path"]
    assert pq.read_metadata(shard).num_row_groups == 2
    reference = tmp_path / "reference.parquet"
    shards.write_table_atomic(pq.read_table(shard), reference)
    assert reference.read_bytes() == shard.read_bytes()
