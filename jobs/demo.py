"""`make demo` / `python -m jobs.demo`: the whole product end to end on embedded defaults.

Synthetic Criteo as TSV → conversion to Parquet shards → training on Ray Train (2 workers,
CAFE-compressed tables) → the collapsed serving model on Ray Serve → real Criteo rows
scored over REST. Beside the compressed model's AUC the summary shows the uncompressed
model's on the same rows, so the cost of compression is in view. Each stage reuses what an
earlier run left in the work folder (the converter skips converted inputs, the train job
resumes its run, the uncompressed reference is trained once and its AUC cached in
uncompressed.json), so a second run is quick; delete the folder to start clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.schema import TERABYTE_CARDINALITIES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "deploy" / "configs" / "small_synthetic.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description="Run embpress end to end on synthetic data: generate → convert → train "
        "on Ray (2 workers, compressed embeddings) → export → score. Output goes under "
        "--workdir; a second run reuses it.",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                        help="folder for data, run and model (default: runs/demo)")
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="synthetic rows over all days (default: 1,000,000)")
    parser.add_argument("--days", type=int, default=2, help="synthetic days (default: 2)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="training config (default: deploy/configs/small_synthetic.yaml)")
    parser.add_argument("--stage", choices=["data", "train", "all"], default="all",
                        help="stop after this stage (default: all)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port of the scoring service during the demo (default: 8000)")
    return parser


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def make_data(workdir: Path, rows: int, days: int) -> Path:
    from jobs import prepare, synth

    tsv, data = workdir / "tsv", workdir / "data"
    t = _stage(f"1. synthetic Criteo: {rows:,} rows over {days} days as TSV")
    if not (tsv / "synthetic.json").is_file():
        if synth.main(["--rows", str(rows), "--days", str(days), "--out", str(tsv),
                       "--format", "tsv"]) != 0:
            raise SystemExit("synthetic data generation failed")
    else:
        print(f"reusing {tsv}")
    print(f"({time.perf_counter() - t:.1f} s)")
    t = _stage("2. convert TSV → Parquet shards (+ manifest, rejects, statistics)")
    inputs = sorted(str(p) for p in tsv.glob("day_*"))
    if prepare.main(["--input", *inputs, "--output", str(data)]) != 0:
        raise SystemExit("conversion failed")
    print(f"({time.perf_counter() - t:.1f} s)")
    return data


def train(workdir: Path, data: Path, config_path: Path) -> dict:
    from jobs.config import load_config
    from jobs.ray_session import ensure_ray
    from training.config import TrainConfig
    from training.run import run

    config = load_config(config_path, TrainConfig, {
        "data": {"path": data},
        "run": {"storage_path": workdir / "runs"},
        "export": {"out": workdir / "model"},
    })
    t = _stage(f"3. train on Ray Train ({config.scaling.num_workers} workers), then export")
    ensure_ray()
    metrics = run(config).metrics or {}
    print(f"({time.perf_counter() - t:.1f} s)")
    dim = config.model_spec.table_dim
    return {"metrics": metrics, "model_dir": config.export_dir, "dim": dim,
            "uncompressed": uncompressed_reference(workdir, data, config)}


def uncompressed_reference(workdir: Path, data: Path, config: Any) -> dict[str, Any]:
    """AUC of the same model with uncompressed tables on the same rows: trained on the first
    run only, then read from uncompressed.json while the data and the model are the same."""
    from embeddings.methods.full import FullConfig
    from training.config import EmbeddingSettings
    from training.run import run
    from training.settings import ExportSettings

    cache = workdir / "uncompressed.json"
    manifest = json.loads((data / "manifest.json").read_text())
    key = {"rows": manifest["rows"], "positives": manifest.get("positives"),
           "model": config.model_spec.model_dump(mode="json"),
           "optimizer": config.optimizer.model_dump(mode="json"),
           "schedule": config.schedule.model_dump(mode="json"), "seed": config.seed}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            print(f"uncompressed reference: reusing {cache}")
            return cached["metrics"]
    t = _stage("3b. train the same model uncompressed once, for reference (cached)")
    full = config.model_copy(update={
        "embeddings": EmbeddingSettings(dim=config.embeddings.dim, method=FullConfig()),
        "run": config.run.model_copy(update={"name": f"{config.run.name}_uncompressed"}),
        "export": ExportSettings(out=workdir / "model_uncompressed"),
    })
    metrics = run(full, verbose=False).metrics or {}
    kept = {k: metrics.get(k) for k in ("validation_auc", "test_auc", "serving_bytes")}
    cache.write_text(json.dumps({"key": key, "metrics": kept}, indent=1))
    print(f"({time.perf_counter() - t:.1f} s)")
    return kept


def scoring_input(workdir: Path) -> Path:
    """Real unlabelled Criteo rows when the shared samples are here, else synthetic rows."""
    real = Path(os.environ.get("EMBPRESS_REAL_DATA", REPO.parent / "shared" / "data"))
    sample = real / "criteo_kaggle_unlabeled_sample.tsv"
    if sample.is_file():
        return sample
    synthetic = workdir / "score_rows.tsv"
    with open(sorted((workdir / "tsv").glob("day_*"))[-1]) as src, open(synthetic, "w") as dst:
        dst.writelines(line for _, line in zip(range(2000), src, strict=False))
    return synthetic


def serve_and_score(workdir: Path, model_dir: Path, port: int) -> list[float]:
    """Start Ray Serve on the exported model, score rows over HTTP, shut Serve down."""
    from ray import serve

    from jobs import score
    from jobs import serve as serve_job

    t = _stage("4. serve the collapsed model on Ray Serve and score rows over REST")
    args = serve_job.build_parser().parse_args(["--model", str(model_dir), "--port", str(port)])
    serve_job.check_port(args.host, args.port, "HTTP")
    urls, _ = serve_job.start_service(args)
    rows = scoring_input(workdir)
    out = workdir / "scores.tsv"
    url = f"http://127.0.0.1:{port}"
    print(f"scoring service at {url} ({urls}); POST {url}/v1/score with {rows.name}")
    try:
        if score.main(["--url", url, "--input", str(rows), "--output", str(out)]) != 0:
            raise SystemExit("scoring failed")
    finally:
        serve.shutdown()
    scores = [float(v.split("\t")[-1]) for v in out.read_text().splitlines()[1:]]
    print(f"{len(scores):,} rows scored → {out} ({time.perf_counter() - t:.1f} s)")
    return scores


def summarise(data: Path, trained: dict, scores: list[float] | None = None) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    model = json.loads((trained["model_dir"] / "model.json").read_text())
    m = trained["metrics"]
    teacher = _teacher_auc(data.parent / "tsv" / "synthetic.json")
    serving = model["serving_bytes"]["embeddings"]
    uncompressed = 4 * trained["dim"] * sum(_cardinalities(data))
    print("\n=== results ===")
    print(f"data:            {manifest['rows']:,} rows in {data}")
    print(f"validation AUC:  {m.get('validation_auc', float('nan')):.4f}   "
          f"test AUC: {m.get('test_auc', float('nan')):.4f}   "
          f"rare-id AUC: {m.get('validation_auc_rare', float('nan')):.4f}"
          + (f"   (teacher ceiling {teacher:.4f})" if teacher else ""))
    full = trained.get("uncompressed") or {}
    if full.get("validation_auc") is not None:
        cost = full["validation_auc"] - m.get("validation_auc", float("nan"))
        print(f"uncompressed:    validation AUC {full['validation_auc']:.4f}   test AUC "
              f"{full.get('test_auc', float('nan')):.4f}   (same rows; compression cost "
              f"{cost:+.4f} validation AUC)")
    print(f"embeddings:      {serving:,} bytes served vs {uncompressed:,} uncompressed fp32 "
          f"({uncompressed / serving:.1f}x smaller)")
    terabyte = 4 * 128 * sum(TERABYTE_CARDINALITIES)
    print(f"                 (Criteo Terabyte at d=128 uncompressed: {terabyte / 2**30:.1f} GiB)")
    print(f"model:           {trained['model_dir']}")
    if scores:
        sample = ", ".join(f"{p:.4f}" for p in scores[:8])
        mean = sum(scores) / len(scores)
        print(f"scores:          {len(scores):,} rows over REST, mean {mean:.4f}; first: {sample}")


def _teacher_auc(synthetic_manifest: Path) -> float | None:
    """The planted teacher's validation AUC: the ceiling any model can reach."""
    if not synthetic_manifest.is_file():
        return None
    splits = json.loads(synthetic_manifest.read_text()).get("splits", {})
    return splits.get("validation", {}).get("teacher_auc")


def _cardinalities(data: Path) -> list[int]:
    from data_pipeline.stats import load_feature_stats

    stats = load_feature_stats(data)
    return [stats.num_distinct(f) for f in stats.features]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(args.workdir, args.rows, args.days)
    if args.stage == "data":
        print(f"\nshards and manifest: {data}  ({time.perf_counter() - start:.0f} s in all)")
        return 0
    trained = train(args.workdir, data, args.config)
    scores = None
    if args.stage == "all":
        scores = serve_and_score(args.workdir, trained["model_dir"], args.port)
    summarise(data, trained, scores)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
