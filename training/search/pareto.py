"""The answer a search gives: which trials no other trial beats on both AUC and bytes.

Pure functions over trial rows (plain dicts), so the front a search reports can be
recomputed and checked without Ray: the non-dominated set, its CSV and Markdown tables,
and a PNG of every trial with the front and the byte budget.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embeddings.budget import format_bytes as _format_binary

AUC = "validation_auc"
BYTES = "serving_bytes"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], auc: str = AUC, nbytes: str = BYTES
              ) -> bool:
    """Whether `a` is at least as good as `b` on both objectives and better on one."""
    return (a[auc] >= b[auc] and a[nbytes] <= b[nbytes]
            and (a[auc] > b[auc] or a[nbytes] < b[nbytes]))


def pareto_front(rows: Iterable[Mapping[str, Any]], auc: str = AUC, nbytes: str = BYTES
                 ) -> list[Mapping[str, Any]]:
    """The rows no other row dominates (max `auc`, min `nbytes`), by bytes ascending.

    Rows without a finite value of either objective take no part. Exact ties are all kept:
    neither of two equal trials beats the other.
    """
    scored = [r for r in rows if _finite(r.get(auc)) and _finite(r.get(nbytes))]
    # Sorted by bytes, then AUC descending: a row can only be dominated by rows before it
    # or by an equal-bytes row of higher AUC, which also sorts before it.
    scored.sort(key=lambda r: (r[nbytes], -r[auc]))
    front: list[Mapping[str, Any]] = []
    best_auc = -math.inf
    for row in scored:
        if row[auc] > best_auc:
            front.append(row)
            best_auc = row[auc]
        elif row[auc] == best_auc and front and front[-1][nbytes] == row[nbytes]:
            front.append(row)  # an exact tie with the last front row
    return front


def rungs(grace: int, reduction_factor: float, last: int) -> list[int]:
    """ASHA's milestones: grace × reduction_factor^k, below `last` (the trial length)."""
    out, milestone = [], float(grace)
    while round(milestone) < last:
        if not out or round(milestone) > out[-1]:
            out.append(round(milestone))
        milestone *= reduction_factor
    return out


class ParetoRungs:
    """Early stopping for a two-objective search, on ASHA's rungs.

    At each rung (a training step), a trial that reaches it is recorded with its AUC and
    bytes there, and should stop when another trial recorded at that rung dominates it.
    ASHA on AUC alone would stop the small models first, the very end of the front a Pareto
    search is for; a trial nobody dominates may still end on the front.
    """

    def __init__(self, milestones: Sequence[int]) -> None:
        self.rungs: dict[int, dict[str, dict[str, float]]] = {m: {} for m in milestones}

    def should_stop(self, trial: str, step: int, auc: float, nbytes: float) -> bool:
        """Record a report of `trial` at `step`; whether a rung it reached says stop."""
        point = {AUC: auc, BYTES: nbytes}
        for milestone, recorded in self.rungs.items():
            if step < milestone or trial in recorded:
                continue
            recorded[trial] = point
            if any(dominates(other, point) for t, other in recorded.items() if t != trial):
                return True
        return False


def best_under_budget(rows: Iterable[Mapping[str, Any]], budget: int | None,
                      auc: str = AUC, nbytes: str = BYTES) -> Mapping[str, Any] | None:
    """The highest-AUC row whose bytes fit `budget` (None: no limit); fewer bytes break ties."""
    fitting = [r for r in rows if _finite(r.get(auc)) and _finite(r.get(nbytes))
               and (budget is None or r[nbytes] <= budget)]
    if not fitting:
        return None
    return max(fitting, key=lambda r: (r[auc], -r[nbytes]))


def format_bytes(n: float) -> str:
    """Bytes in binary units with three significant figures (1.23 MiB): short enough for
    plot ticks and table cells."""
    return _format_binary(n, ".3g")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # every digit: the CSV is data
    return str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str]) -> Path:
    """`rows` as CSV with these columns (missing values empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table: AUCs to 4 decimals, bytes exact and in binary units."""
    def show(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if column.endswith("auc") and _finite(value):
            return f"{value:.4f}"
        if column.endswith("bytes") and _finite(value):
            return f"{int(value):,} ({format_bytes(value)})"
        if isinstance(value, float):
            return f"{value:.4g}"
        return _cell(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if _numeric(rows, c) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(show(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _numeric(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(_finite(v) for v in values)


def plot_front(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    path: str | Path,
    budget: int | None = None,
    title: str = "validation AUC against serving bytes",
    group: str = "method",
    auc: str = AUC,
    nbytes: str = BYTES,
) -> Path:
    """PNG: every scored trial a point (coloured by `group`), the front a line, the budget a
    vertical line. Trials marked `status != "finished"` (stopped early) are hollow."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if _finite(r.get(auc)) and _finite(r.get(nbytes))]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        _scatter(ax, scored, group, auc, nbytes, plt.get_cmap("tab10"))
        if front:
            xs = [r[nbytes] for r in front]
            ys = [r[auc] for r in front]
            # Steps: with more bytes one can always serve the better, smaller model. Rings
            # mark the front's trials (a one-trial front has no line to see).
            ax.plot(xs, ys, drawstyle="steps-post", color="black", linewidth=1.5, marker="o",
                    markersize=11, markerfacecolor="none", zorder=4,
                    label=f"Pareto front ({len(front)})")
        if budget is not None:
            ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1.3, zorder=1,
                       label=f"budget {format_bytes(budget)}")
        _bytes_axis(ax, [r[nbytes] for r in scored if r[nbytes] > 0] + ([budget] if budget else []))
        ax.set_xlabel("serving bytes (embedding tables and mappers, as exported)")
        ax.set_ylabel("validation AUC")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if scored or budget is not None:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _scatter(ax: Any, scored: Sequence[Mapping[str, Any]], group: str, auc: str, nbytes: str,
             colours: Any) -> None:
    """One colour per group; finished trials filled, those stopped early hollow."""
    groups = sorted({str(r.get(group, "")) for r in scored})
    for k, name in enumerate(groups):
        members = [r for r in scored if str(r.get(group, "")) == name]
        for finished in (True, False):
            part = [r for r in members if (r.get("status", "finished") == "finished")
                    == finished]
            if not part:
                continue
            ax.scatter([r[nbytes] for r in part], [r[auc] for r in part],
                       s=36, color=colours(k % 10) if finished else "none",
                       edgecolors=colours(k % 10), linewidths=1.2, zorder=3,
                       label=name if finished else f"{name} (stopped early)")


def _bytes_axis(ax: Any, positive: list[float]) -> None:
    """Bytes in binary units; a log scale when they span more than 20x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log", base=2)  # ticks at 8 KiB, 16 KiB, ... not at 9.77 KiB
        ax.xaxis.set_major_locator(LogLocator(base=2, numticks=12))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
