"""`python -m jobs.serve` and `python -m jobs.export`: the checks and errors a user meets.

Starting the server for real is exercised by jobs/benchmarks/serve_latency.py (both paths)
and the Serve tests; here only what happens before Ray starts, and the re-export.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from embeddings.serving import MODEL_FILE, load_model
from jobs import export as export_job
from jobs import serve as serve_job


def test_serve_refuses_a_missing_or_broken_model_dir(model_dirs, capsys):
    assert serve_job.main(["--model", str(model_dirs["missing"])]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_job.main(["--model", str(model_dirs["checksum"])]) == 2
    assert "fails its checksum" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(model_dirs, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_job.main(["--model", str(model_dirs["v1"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err


def test_serve_check_only(model_dirs, capsys):
    assert serve_job.main(["--check", str(model_dirs["v1"])]) == 0
    assert "servable; version v1, 26 categorical features" in capsys.readouterr().out


def _scores(model_dir) -> np.ndarray:
    model, _ = load_model(model_dir)
    gen = torch.Generator().manual_seed(1)
    dense = torch.rand(512, 13, generator=gen) * 5
    sparse = torch.randint(0, 2**32, (512, 26), generator=gen)
    with torch.inference_mode():
        return torch.sigmoid(model(dense, sparse)).numpy()


@pytest.mark.parametrize("fmt", ["none", "fp16", "int8", "int4"])
def test_export_quantises_and_keeps_the_metadata(fmt, model_dirs, tmp_path, capsys):
    out = tmp_path / f"model-{fmt}"
    assert export_job.main(["--model-dir", str(model_dirs["v1"]), "--out", str(out),
                            "--quantize", fmt]) == 0
    assert "wrote" in capsys.readouterr().out
    document = json.loads((out / MODEL_FILE).read_text())
    assert document["quantize"] == fmt
    assert document["version"] == ("v1" if fmt == "none" else f"v1-{fmt}")
    assert document["source"]["model_dir"] == str(model_dirs["v1"].resolve())
    source = json.loads((model_dirs["v1"] / MODEL_FILE).read_text())
    if fmt == "none":
        assert document["weights_sha256"] == source["weights_sha256"]
    else:
        assert document["serving_bytes"]["embeddings"] < source["serving_bytes"]["embeddings"]
    gap = np.abs(_scores(out) - _scores(model_dirs["v1"])).max()
    assert gap <= {"none": 0, "fp16": 1e-3, "int8": 1e-2, "int4": 1e-1}[fmt]


def test_export_mixed_fits_the_budget_with_hot_rows_in_the_wider_formats(
    model_dirs, synth_data, tmp_path, capsys
):
    source = json.loads((model_dirs["v1"] / MODEL_FILE).read_text())
    fp32 = source["serving_bytes"]["embeddings"]
    int4 = tmp_path / "int4"
    assert export_job.main(["--model-dir", str(model_dirs["v1"]), "--out", str(int4),
                            "--quantize", "int4"]) == 0
    smallest = json.loads((int4 / MODEL_FILE).read_text())["serving_bytes"]["embeddings"]
    budget = smallest + (fp32 - smallest) // 4  # between all-int4 and all-fp16
    out = tmp_path / "mixed"
    assert export_job.main(["--model-dir", str(model_dirs["v1"]), "--out", str(out),
                            "--quantize", "mixed", "--budget-bytes", str(budget),
                            "--data", str(synth_data)]) == 0
    assert "wrote" in capsys.readouterr().out
    document = json.loads((out / MODEL_FILE).read_text())
    assert document["quantize"] == "mixed"
    assert budget * 0.9 <= document["serving_bytes"]["embeddings"] <= budget
    formats = document["mixed_precision"]["rows_per_format"]
    assert formats.get("int4", 0) > 0 and formats.get("int8", 0) + formats.get("fp16", 0) > 0
    # Rows the data reads most got the wider formats: the read rows score closer than int4.
    from data_pipeline.stats import load_feature_stats

    stats = load_feature_stats(synth_data)
    name = stats.features[0]
    values = torch.as_tensor(stats.counts(name)[0][:64])  # the most read values
    model, _ = load_model(model_dirs["v1"])
    mixed, _ = load_model(out)
    coarse, _ = load_model(int4)
    j = model.names.index(name)
    with torch.no_grad():
        exact = model.embeddings[j](values)
        assert (mixed.embeddings[j](values) - exact).abs().max() \
            < (coarse.embeddings[j](values) - exact).abs().max()


def test_export_mixed_errors_name_their_option(model_dirs, tmp_path, capsys):
    base = ["--model-dir", str(model_dirs["v1"]), "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit):
        export_job.main([*base, "--quantize", "mixed"])
    assert "--budget-bytes" in capsys.readouterr().err
    assert export_job.main([*base, "--quantize", "mixed", "--budget-bytes", "10",
                            "--data", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err


def test_export_errors(model_dirs, tmp_path, capsys):
    def run(*argv: str) -> str:
        assert export_job.main(list(argv)) == 2
        return capsys.readouterr().err

    assert "does not exist" in run("--model-dir", str(model_dirs["missing"]),
                                   "--out", str(tmp_path / "a"))
    assert "fails its checksum" in run("--checkpoint", str(model_dirs["truncated"]),
                                       "--out", str(tmp_path / "b"))
    assert "no model.json" in run("--checkpoint", str(tmp_path), "--out", str(tmp_path / "c"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert "not an empty directory" in run("--model-dir", str(model_dirs["v1"]),
                                           "--out", str(taken))
    int8 = tmp_path / "int8"
    assert export_job.main(["--model-dir", str(model_dirs["v1"]), "--out", str(int8),
                            "--quantize", "int8"]) == 0
    assert "already quantised" in run("--model-dir", str(int8), "--out", str(tmp_path / "d"),
                                      "--quantize", "int4")


def test_check_of_weights_that_disagree_with_model_json_is_one_line(model_dirs, tmp_path,
                                                                     capsys):
    # Same weights (the checksum still passes), a model.json that declares other shapes.
    bent = tmp_path / "bent"
    bent.mkdir()
    for name in ("weights.safetensors", MODEL_FILE):
        (bent / name).write_bytes((model_dirs["v1"] / name).read_bytes())
    document = json.loads((bent / MODEL_FILE).read_text())
    document["model"]["top_mlp"] = [32, 32, 1]
    (bent / MODEL_FILE).write_text(json.dumps(document))
    assert serve_job.main(["--check", str(bent)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error: ") and "Traceback" not in lines[0]
