"""Benchmark: validation AUC of every compression method at 10×, 100× and 1000× beside the
uncompressed model and the teacher, overall and on rows with rare ids (issue 4's table).

Every cell trains the same model (the config's, `deploy/configs/synthetic_quality.yaml` by
default) on the same synthetic data with the same schedule, through the train job's own
per-worker function in this process (one worker: the fastest path on a small machine), and
reads the metrics the job exports. "rare" is the job's band: rows where at least one large
feature (≥ 1,000 values) has an id seen fewer than 10 times in train. The teacher row scores
the same validation rows with the generator's planted model: the ceiling of every column.

Each finished cell is appended to OUT/results.jsonl and skipped when the script runs again,
so an interrupted run resumes where it stopped. Run:
`python jobs/benchmarks/compression_quality.py --out /tmp/quality [--rows 11000000 --days 11]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import os
import shutil
import time
from typing import Any

import numpy as np
import torch

from data_pipeline import synthetic
from data_pipeline.shards import read_manifest
from data_pipeline.stats import load_feature_stats
from data_pipeline.transforms import transform_table
from embeddings.metrics import auc_by_band, roc_auc, row_bands
from embeddings.serving import read_model_json
from jobs import synth
from jobs.config import load_config
from jobs.train import ensure_ray, plan_run
from jobs.train_config import TrainConfig
from jobs.train_loop import _bands, train_loop_per_worker

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "deploy" / "configs" / "synthetic_quality.yaml"
RESULTS = "results.jsonl"
UNCOMPRESSED = "uncompressed"
# The compressed methods of the table; MLET wraps the hashing trick (k = 4d by default).
METHODS: dict[str, dict[str, Any]] = {
    "hash": {"method": "hash"},
    "qr": {"method": "qr"},
    "mlet": {"method": "hash", "mlet_dim": "4d"},
    "cafe": {"method": "cafe"},
    "learned_hash": {"method": "learned_hash"},
}
RATIOS = (10.0, 100.0, 1000.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Cells already in OUT/results.jsonl are skipped; delete the file to start over.",
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for data (unless --data), results.jsonl and runs")
    parser.add_argument("--data", type=Path,
                        help="an existing synthetic dataset (default: generate OUT/data)")
    parser.add_argument("--rows", type=int, default=11_000_000,
                        help="rows to generate over all days (default: %(default)s)")
    parser.add_argument("--days", type=int, default=11,
                        help="days to generate; the last is validation + test "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="training config of every cell (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--max-steps", type=int,
                        help="cut every cell's training short (smoke runs)")
    return parser


def _cells(methods: list[str], ratios: list[float]) -> list[tuple[str, float | None]]:
    return [(UNCOMPRESSED, None)] + [(m, r) for m in methods for r in ratios]


def _key(method: str, ratio: float | None) -> str:
    return method if ratio is None else f"{method}@{ratio:g}x"


def _done(results: Path) -> dict[str, dict[str, Any]]:
    if not results.is_file():
        return {}
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {r["cell"]: r for r in rows}


def _embeddings(method: str, ratio: float | None, dim: int) -> dict[str, Any]:
    if method == UNCOMPRESSED:
        return {"method": {"method": "full"}}
    spec = dict(METHODS[method])
    if spec.get("mlet_dim") == "4d":
        spec["mlet_dim"] = 4 * dim
    return {"method": spec, "ratio": ratio}


def train_cell(base: TrainConfig, out: Path, method: str, ratio: float | None,
               max_steps: int | None) -> dict[str, Any]:
    """Train one cell in this process and return its exported metrics."""
    key = _key(method, ratio)
    name = key.replace("@", "_")
    schedule = base.schedule.model_copy(update={"max_steps": max_steps} if max_steps else {})
    config = TrainConfig.model_validate({
        **base.model_dump(),
        "embeddings": _embeddings(method, ratio, base.model_spec.embedding_dim),
        "schedule": schedule.model_dump(),
        "scaling": {**base.scaling.model_dump(), "num_workers": 0},
        "run": {"storage_path": out / "runs", "name": name},
        "export": {"out": None, "quantize": "none"},
    })
    shutil.rmtree(config.run_dir, ignore_errors=True)  # a cell killed midway starts over
    t0 = time.perf_counter()
    spec = plan_run(config, verbose=False)
    train_loop_per_worker({"spec": spec.__dict__})
    metrics = read_model_json(config.export_dir)["metrics"]
    shutil.rmtree(config.run_dir, ignore_errors=True)
    keep = ("validation_auc", "validation_auc_rare", "validation_auc_medium",
            "validation_auc_hot", "validation_rows_rare", "validation_log_loss",
            "serving_bytes", "training_bytes_rank0", "samples")
    return {"cell": key, "method": method, "ratio": ratio,
            **{k: metrics.get(k) for k in keep}, "seconds": round(time.perf_counter() - t0)}


def teacher_row(data: Path) -> dict[str, Any]:
    """The planted model's AUC on the validation rows, overall and per band (as the job)."""
    manifest = read_manifest(data)
    config = synthetic.SynthConfig(**manifest["synthetic"]["params"])
    day = config.days - 1
    start, stop = synthetic.split_boundaries(config.day_rows(), day)
    logits, table = synthetic.teacher_logits(config, day, start, stop)
    batch = transform_table(table)
    stats = load_feature_stats(data)
    names = list(stats.features)
    columns = [j for j, n in enumerate(names) if stats.num_distinct(n) >= 1000]
    # The job's own banding (missing values included), so teacher and models band alike.
    bands = row_bands(_bands(stats, names, columns, torch.from_numpy(batch["sparse"])))
    labels = batch["label"]
    by_band = auc_by_band(logits, labels, bands)
    return {"cell": "teacher", "validation_auc": roc_auc(logits, labels),
            **{f"validation_auc_{b}": v for b, v in by_band.items()},
            "validation_rows_rare": float((bands == 0).sum())}


def _fmt(x: Any, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def print_table(done: dict[str, dict[str, Any]], methods: list[str], ratios: list[float],
                teacher: dict[str, Any]) -> None:
    full = done.get(UNCOMPRESSED, {})
    print("\nvalidation AUC, overall / rows with a rare id")
    head = f"{'method':<14}" + "".join(f"{f'{r:g}x':>22}" for r in ratios)
    print(head)
    for name, row in (("teacher", teacher), (UNCOMPRESSED, full)):
        cell = f"{_fmt(row.get('validation_auc'))} / {_fmt(row.get('validation_auc_rare'))}"
        print(f"{name:<14}{cell:>22}   (all ratios)")
    for m in methods:
        cells = []
        for r in ratios:
            row = done.get(_key(m, r), {})
            cells.append(f"{_fmt(row.get('validation_auc'))} / "
                         f"{_fmt(row.get('validation_auc_rare'))}")
        print(f"{m:<14}" + "".join(f"{c:>22}" for c in cells))
    if full.get("serving_bytes"):
        print("\nserving bytes (measured ratio to uncompressed)")
        print(head)
        for m in methods:
            cells = []
            for r in ratios:
                b = done.get(_key(m, r), {}).get("serving_bytes")
                cells.append("—" if not b else f"{b:,} ({full['serving_bytes'] / b:.0f}x)")
            print(f"{m:<14}" + "".join(f"{c:>22}" for c in cells))
    if full.get("validation_auc") and teacher.get("validation_auc"):
        gap = teacher["validation_auc"] - full["validation_auc"]
        print(f"\nuncompressed vs teacher: {full['validation_auc']:.4f} vs "
              f"{teacher['validation_auc']:.4f} (gap {gap:.4f}; goal ≤ 0.02)")
    rare = teacher.get("validation_rows_rare")
    if rare is not None:
        print(f"rows with a rare id: {int(rare):,} of the validation split")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else out / "data"
    if not (data / "manifest.json").is_file():
        if args.data:
            raise SystemExit(f"{data} holds no finished dataset (manifest.json)")
        synth.main(["--rows", str(args.rows), "--days", str(args.days), "--seed",
                    str(args.seed), "--out", str(data), "--no-ray", "--no-progress"])
    base = load_config(args.config, TrainConfig)
    base = base.model_copy(update={"data": base.data.model_copy(update={"path": data})})
    # One worker in this process: give torch every core (the job's workers default to 1).
    os.environ.setdefault("EMBPRESS_TORCH_THREADS", str(os.cpu_count() or 1))
    ensure_ray(num_cpus=os.cpu_count())
    results = out / RESULTS
    done = _done(results)
    cells = _cells(args.methods, args.ratios)
    for i, (method, ratio) in enumerate(cells):
        key = _key(method, ratio)
        if key in done:
            continue
        print(f"[quality] cell {i + 1}/{len(cells)}: {key}", flush=True)
        row = train_cell(base, out, method, ratio, args.max_steps)
        print(f"[quality] {key}: AUC {_fmt(row['validation_auc'])} rare "
              f"{_fmt(row['validation_auc_rare'])} ({row['seconds']} s)", flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
    print(f"\ncompression quality on {data} ({read_manifest(data)['rows']:,} rows), "
          f"config {args.config}")
    print_table(done, args.methods, args.ratios, teacher_row(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
