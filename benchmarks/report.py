"""Summaries of result rows: Markdown tables and the needle-in-a-haystack heat-map."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

Row = dict[str, Any]


def _short(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _table(title: str, rows: Sequence[Row], cell: Callable[[list[Row]], str]) -> str:
    """Methods down, lengths across; `cell` renders the rows of one (method, length)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if cell([r])))
    lengths = sorted({r["length"] for r in rows})
    groups: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for r in rows:
        groups[r["method"], r["length"]].append(r)
    lines = [f"### {title}", "", "| method | " + " | ".join(map(_short, lengths)) + " |",
             "|---|" + "---:|" * len(lengths)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(groups.get((m, n), [])) for n in lengths) + " |")
    return "\n".join(lines)


def _score_cell(rows: list[Row]) -> str:
    if not rows:
        return ""
    ok = [r["score"] for r in rows if r["error"] is None]
    errors = len(rows) - len(ok)
    text = f"{100 * fmean(ok):.0f}" if ok else "–"
    if any(r.get("full_attention") for r in rows):  # the reading fit the model's window (`full_within_window`)
        text += "ᶠ"
    return text + (f" ({errors} err)" if errors else "")


def _recall_cell(rows: list[Row]) -> str:
    values = [r["evidence_recall"] for r in rows if r.get("evidence_recall") is not None]
    return f"{100 * fmean(values):.0f}" if values else ""


def seconds_per_question(row: Row) -> float:
    """Wall time of one answer, plus its share of a read-once pass."""
    return row["wall_s"] + (row["read_s"] or 0.0) / row["questions"]


def _time_cell(rows: list[Row]) -> str:
    ok = [seconds_per_question(r) for r in rows if r["error"] is None]
    return f"{fmean(ok):.2f}" if ok else ""


def summarize(rows: Sequence[Row]) -> str:
    """Markdown: accuracy per task, mean accuracy over tasks, evidence recall, seconds per question."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    parts = [_table(f"{t}: accuracy (%)", [r for r in rows if r["task"] == t], _score_cell) for t in tasks]
    if len(tasks) > 1:
        parts.append(_table("all tasks: mean accuracy (%)", rows, _score_cell))
    if any(r.get("evidence_recall") is not None for r in rows):
        parts.append(_table("evidence in looked-up blocks (%, block-memory methods)", rows, _recall_cell))
    parts.append(_table("seconds per question (read-once pass shared among its questions)", rows, _time_cell))
    if any(r.get("full_attention") for r in rows):
        parts.append("ᶠ answered with the model's own full attention: the reading fit its trained window "
                     "(`full_within_window`; `--set full_within_window=false` measures block memory there too)")
    return "\n\n".join(parts) + "\n"


def plot_niah(rows: Iterable[Row], path: Path, task: str = "niah") -> Path | None:
    """Heat-map of `task`'s accuracy, depth × length, one panel per method; None if `task` has no rows."""
    niah = [r for r in rows if r["task"] == task and r["error"] is None]
    if not niah:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in niah))
    lengths = sorted({r["length"] for r in niah})
    depths = sorted({round(r["depth"], 4) for r in niah})
    size = (1.2 + 0.9 * len(lengths) * len(methods), 1.5 + 0.4 * len(depths))
    fig, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        cells: dict[tuple[float, int], list[float]] = defaultdict(list)
        for r in niah:
            if r["method"] == method:
                cells[round(r["depth"], 4), r["length"]].append(r["score"])
        grid = [[fmean(cells[d, n]) if cells[d, n] else float("nan") for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{task}: {method}" if len(methods) == 1 else method, fontsize=9)
        ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context tokens")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write(out: Path, meta: dict[str, Any], rows: list[Row], maps: bool = True) -> list[Path]:
    """`out`/results.json (replaced atomically), summary.md and (`maps`) a heat-map per NIAH task; the paths
    written."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")
    (out / "summary.md").write_text(summarize(rows) if rows else "no results yet\n", encoding="utf-8")
    maps = [plot_niah(rows, out / f"{task}_heatmap.png", task)
            for task in dict.fromkeys(r["task"] for r in rows) if maps and task.startswith("niah")]
    return [out / "results.json", out / "summary.md", *(m for m in maps if m)]
