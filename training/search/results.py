"""What a search leaves in its experiment folder: every trial (CSV), the Pareto front (CSV,
Markdown, PNG), a summary (JSON), and the best model under the budget in the serving format.

Trial rows are plain dicts read from Tune's ResultGrid, so the front and its files can be
recomputed and checked without Ray (`training.search.pareto`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.search import pareto
from training.search.config import TuneConfig

BEST_MODEL_DIR = "best_model"
UNFINISHED = frozenset({"PENDING", "RUNNING", "PAUSED"})  # Tune trial statuses
STATUSES = ("finished", "stopped", "skipped", "interrupted", "error")
TRIAL_COLUMNS = [
    "trial", "status", "method", "method_settings", "mlet", "ratio", "embedding_dim",
    "sparse_lr", "dense_lr", "quantize", "step", "validation_auc", "test_auc",
    "serving_bytes", "within_budget", "on_front", "model",
]
FRONT_COLUMNS = [
    "trial", "method", "method_settings", "mlet", "ratio", "embedding_dim", "quantize",
    "validation_auc", "test_auc", "serving_bytes", "within_budget",
]
# Point settings copied into a trial's row as they are.
_POINT_COLUMNS = ("mlet", "ratio", "embedding_dim", "sparse_lr", "dense_lr", "quantize")
_METRIC_COLUMNS = ("step", "validation_auc", "test_auc", "serving_bytes", "within_budget")


@dataclass
class SearchResult:
    """What a search leaves in its experiment folder, and where."""

    experiment_dir: Path
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    budget: int | None
    complete: bool = True
    files: dict[str, Path] = field(default_factory=dict)


def _status(result: Any, metrics: dict[str, Any], saved: str | None) -> str:
    if saved in UNFINISHED:
        return "interrupted"
    if saved == "ERROR" or result.error is not None:
        return "error"
    if metrics.get("skipped"):
        return "skipped"
    if "test_auc" in metrics:
        return "finished"
    return "stopped"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _last_line(error: BaseException | None) -> str:
    """The message of a trial's error without Ray's traceback and terminal colours."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def _row(result: Any, saved: dict[str, str]) -> dict[str, Any]:
    """One trial's plain row: its point, status, objectives and model."""
    metrics = dict(result.metrics or {})
    point = dict(result.config or {})
    method = point.get("method", "")
    settings = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}"
                         for k, v in sorted(point.items()) if k.startswith(f"{method}."))
    trial_dir = Path(result.path)
    status = _status(result, metrics, saved.get(trial_dir.name))
    model = trial_dir / "model"
    return {
        "trial": metrics.get("trial_id") or trial_dir.name.removeprefix("trial_"),
        "status": status,
        "method": method,
        "method_settings": settings,
        **{k: point.get(k) for k in _POINT_COLUMNS},
        **{k: metrics.get(k) for k in _METRIC_COLUMNS},
        "model": str(model) if status == "finished" and (model / "model.json").is_file()
        else "",
        "trial_dir": str(trial_dir),
        "error": _last_line(result.error),
    }


def trial_rows(results: Any, saved: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One plain row per trial of a Tune ResultGrid (config, status, objectives, model).

    `saved`: trial folder name → the status Tune saved in the experiment state (an
    interrupted search leaves unfinished trials RUNNING or PENDING there).
    """
    rows = [_row(result, saved or {}) for result in results]
    rows.sort(key=lambda r: r["trial"])
    return rows


def _markdown(config: TuneConfig, rows: list[dict[str, Any]], front: list[dict[str, Any]],
              best: dict[str, Any] | None, complete: bool) -> str:
    """pareto.md: the objective, the trial counts, the front and the best model."""
    budget = config.objective.max_serving_bytes
    counts = _counts(rows)
    objective = ("two objectives: max validation AUC, min serving bytes"
                 if config.objective.mode == "pareto"
                 else "max validation AUC with serving bytes ≤ the budget")
    lines = [
        f"# Pareto front of `{config.run.name}`",
        "",
        f"Objective: {objective}. Budget: "
        + (f"{budget:,} bytes ({pareto.format_bytes(budget)})." if budget else "none."),
        f"Trials: {len(rows)} ({counts['finished']} finished, {counts['stopped']} stopped "
        f"early at a rung, {counts['skipped']} skipped as over budget or out of the "
        f"method's reach, {counts['interrupted']} interrupted, {counts['error']} failed)."
        + ("" if complete else " The search was interrupted: `--resume` continues it."),
        "",
        pareto.markdown_table(front, FRONT_COLUMNS),
    ]
    if best is not None:
        lines.append(f"Best under the budget: trial `{best['trial']}`, validation AUC "
                     f"{best['validation_auc']:.4f}, {best['serving_bytes']:,} serving bytes; "
                     f"exported to `{BEST_MODEL_DIR}/`.")
    else:
        lines.append("No finished trial fits the budget: nothing exported.")
    return "\n".join(lines) + "\n"


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES}


def _export_best(best: dict[str, Any] | None, best_dir: Path) -> Path | None:
    """Copy the best trial's model to `best_dir` (checked to load), or clear what an
    earlier budget left there."""
    from embeddings.serving import load_model

    if best_dir.exists():
        shutil.rmtree(best_dir)
    if best is None:
        return None
    shutil.copytree(best["model"], best_dir)
    load_model(best_dir)  # a copy that does not load is no answer
    return best_dir


def write_results(config: TuneConfig, rows: list[dict[str, Any]], complete: bool = True
                  ) -> SearchResult:
    """The Pareto front (CSV, Markdown, PNG), every trial (CSV), and the best model
    under the budget copied to <experiment>/best_model in the serving format."""
    out = config.experiment_dir
    budget = config.objective.max_serving_bytes
    finished = [r for r in rows if r["status"] == "finished"]
    # Only finished trials made a model; a stopped trial's AUC is that of a half-trained one.
    front = list(pareto.pareto_front(finished))
    on_front = {r["trial"] for r in front}
    for r in rows:
        r["on_front"] = int(r["trial"] in on_front)
    best = pareto.best_under_budget(finished, budget)
    files = {
        "trials_csv": pareto.write_csv(rows, out / "trials.csv", TRIAL_COLUMNS),
        "pareto_csv": pareto.write_csv(front, out / "pareto.csv", FRONT_COLUMNS),
        "pareto_md": out / "pareto.md",
    }
    files["pareto_md"].write_text(_markdown(config, rows, front, best, complete))
    files["pareto_png"] = pareto.plot_front(
        [r for r in rows if r["status"] in ("finished", "stopped", "interrupted")], front,
        out / "pareto.png",
        budget=budget, title=f"{config.run.name}: validation AUC against serving bytes")
    best_dir = _export_best(best, out / BEST_MODEL_DIR)
    if best_dir is not None:
        files["best_model"] = best_dir
    summary = {
        "experiment": str(out),
        "objective": config.objective.model_dump(),
        "trials": _counts(rows),
        "complete": complete,
        "front": [r["trial"] for r in front],
        "best": None if best is None else {k: best[k] for k in (*FRONT_COLUMNS, "model")},
        "files": {k: str(v) for k, v in files.items()},
    }
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return SearchResult(out, rows, front, best, budget, complete, files)
