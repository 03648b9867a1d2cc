"""What a training job ends with: its result in a few lines (AUC overall and on rare ids,
the served bytes and ratio, where the model, the checkpoint and the curves are), and the
same as `summary.json` in the run folder for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embeddings.serving import MODEL_FILE, read_model_json
from training.config import TrainConfig

SUMMARY_FILE = "summary.json"


def train_summary(config: TrainConfig, result: Any) -> dict[str, Any]:
    """The run's result from Ray Train's (rank 0's last report) and the exported model."""
    metrics = dict(result.metrics or {})
    exported = (read_model_json(config.export_dir)
                if (Path(config.export_dir) / MODEL_FILE).is_file() else {})
    checkpoint = getattr(result, "checkpoint", None)
    return {
        **{key: metrics.get(key) for key in ("validation_auc", "validation_auc_rare",
                                              "test_auc", "test_auc_rare", "step")},
        # Served embedding bytes (model.json also counts the dense layers apart).
        "serving_bytes": exported.get("serving_bytes", {}).get("embeddings",
                                                               metrics.get("serving_bytes")),
        "dense_bytes": exported.get("serving_bytes", {}).get("dense"),
        "compression_ratio": exported.get("compression_ratio"),
        "model": str(config.export_dir) if exported else None,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "run": str(config.run_dir),
        "tensorboard": f"tensorboard --logdir {config.run_dir / 'tensorboard'}",
    }


def write_summary(config: TrainConfig, summary: dict[str, Any]) -> Path:
    path = Path(config.run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def format_summary(summary: dict[str, Any], path: Path) -> str:
    """The block the job prints last."""

    def auc(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    ratio = summary.get("compression_ratio")
    size = f"{summary['serving_bytes']:,} bytes" if summary.get("serving_bytes") else "n/a"
    lines = [
        "=== train: result ===",
        f"validation AUC  {auc('validation_auc')}   rare ids {auc('validation_auc_rare')}",
        f"test AUC        {auc('test_auc')}   rare ids {auc('test_auc_rare')}",
        f"embeddings      {size}" + (f", {ratio:,.1f}x smaller than fp32" if ratio else "")
        + (f" (dense layers {summary['dense_bytes']:,} bytes)" if summary.get("dense_bytes")
           else ""),
        f"model           {summary.get('model') or 'not exported'}",
        f"checkpoint      {summary.get('checkpoint') or 'none'}",
        f"curves          {summary['tensorboard']}",
        f"this summary    {path}",
    ]
    return "\n".join(lines)
