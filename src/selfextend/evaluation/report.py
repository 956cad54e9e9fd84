"""Summaries and plots of evaluation rows: a table (printed and CSV), heatmaps, accuracy and NLL curves."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _params(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row["params"].items())


def summarize(rows: list[dict]) -> list[dict]:
    """One line per task, model, method and length: accuracy (with count) or mean NLL and perplexity."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["model"], row["method"], row["length"])].append(row)
    order = {method: i for i, method in enumerate(_methods(rows))}  # methods in the order they ran
    summary = []
    for (task, model, method, length), members in sorted(groups.items(), key=lambda g: (
            g[0][0], g[0][1], order[g[0][2]], g[0][3])):
        line = {"task": task, "model": model, "method": method, "params": _params(members[0]), "length": length,
                "samples": len(members), "seconds": round(sum(r["seconds"] for r in members), 1)}
        if "nll" in members[0]:
            nll = sum(r["nll"] for r in members) / len(members)
            line.update(accuracy="", nll=round(nll, 4), ppl=round(math.exp(nll), 3))
        else:
            line.update(accuracy=round(sum(r["correct"] for r in members) / len(members), 4), nll="", ppl="")
        summary.append(line)
    return summary


def write_csv(summary: list[dict], path: Path) -> None:
    fields = ["task", "model", "method", "params", "length", "samples", "accuracy", "nll", "ppl", "seconds"]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)


def format_table(summary: list[dict]) -> str:
    """Methods down, lengths across: accuracy for retrieval tasks, perplexity for `perplexity`."""
    lines = []
    for task in sorted({s["task"] for s in summary}):
        rows = [s for s in summary if s["task"] == task]
        lengths = sorted({s["length"] for s in rows})
        metric = "ppl" if task == "perplexity" else "accuracy"
        lines.append(f"{task} ({metric}; params at the longest length)")
        lines.append(f"{'method':<24}" + "".join(f"{length:>10}" for length in lengths) + "   params")
        for method in dict.fromkeys(s["method"] for s in rows):
            cells = {s["length"]: s for s in rows if s["method"] == method}
            values = "".join(f"{cells[n][metric]:>10}" if n in cells else f"{'-':>10}" for n in lengths)
            lines.append(f"{method:<24}{values}   {cells[max(cells)]['params']}")
        lines.append("")
    return "\n".join(lines)


def nll_by_position(rows: list[dict], per_band: int = 4) -> str:
    """Perplexity rows as methods down, position bands (`per_band` buckets each) across: mean NLL per band.

    Where a method starts to lose the thread shows here, not in one mean over the whole document."""
    lines, rows = [], [r for r in rows if r.get("nll_buckets")]
    for length in sorted({r["length"] for r in rows}):
        members = [r for r in rows if r["length"] == length]
        width = members[0]["bucket"] * per_band
        bands = range(0, length - 1, width)
        lines.append(f"perplexity at {length} tokens: mean NLL (nats) by position")
        lines.append(f"{'method':<24}" + "".join(f"{_band(start, width, length):>14}" for start in bands))
        for row in members:
            lines.append(f"{row['method']:<24}" + "".join(f"{nll:>14.4f}" for nll in _band_means(row, per_band)))
        lines.append("")
    return "\n".join(lines)


def _band(start: int, width: int, length: int) -> str:
    return f"{_tokens(start)}-{_tokens(min(start + width, length))}"


def _tokens(n: int) -> str:
    """A token count as written in tables and axes: 16K for whole multiples of 1024, else the number."""
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def _band_means(row: dict, per_band: int) -> list[float]:
    """Token-weighted means over groups of `per_band` buckets (the last bucket may hold fewer tokens)."""
    predicted, bucket, means = row["tokens"] - 1, row["bucket"], []
    for first in range(0, len(row["nll_buckets"]), per_band):
        group = range(first, min(first + per_band, len(row["nll_buckets"])))
        weights = [min(bucket, predicted - i * bucket) for i in group]
        means.append(sum(w * row["nll_buckets"][i] for w, i in zip(weights, group)) / sum(weights))
    return means


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots: a length × depth heatmap per method, accuracy against length, NLL against position."""
    out_dir = Path(out_dir)
    written = []
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        if task == "perplexity":
            written.append(_nll_plot(task_rows, out_dir / "perplexity_by_position.png"))
            continue
        written.append(_accuracy_plot(task, task_rows, out_dir / f"{task}_accuracy.png"))
        if len({r["depth"] for r in task_rows}) > 1:
            written.append(_heatmaps(task, task_rows, out_dir / f"{task}_heatmap.png"))
    return written


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _accuracy_plot(task: str, rows: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    for method in _methods(rows):
        summary = [s for s in summarize([r for r in rows if r["method"] == method])]
        axes.plot([s["length"] for s in summary], [s["accuracy"] for s in summary], marker="o", label=method)
    axes.set(xlabel="input length (tokens)", ylabel="accuracy", title=f"{task}: accuracy by length", ylim=(-0.05, 1.05))
    axes.set_xscale("log", base=2)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _heatmaps(task: str, rows: list[dict], path: Path) -> Path:
    methods = _methods(rows)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    figure, axes = plt.subplots(1, len(methods), figsize=(1.5 + 2.4 * len(methods), 3.8), squeeze=False,
                                sharey=True, layout="constrained")
    for ax, method in zip(axes[0], methods):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = [r["correct"] for r in rows if r["method"] == method and r["depth"] == depth
                        and r["length"] == length]
                if cell:
                    grid[i][j] = sum(cell) / len(cell)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="accuracy")
    figure.suptitle(f"{task}: accuracy by length and depth")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _nll_plot(rows: list[dict], path: Path) -> Path:
    lengths = sorted({r["length"] for r in rows})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.6), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        for method in _methods(rows):
            row = next((r for r in rows if r["method"] == method and r["length"] == length), None)
            if row is None:
                continue
            centres = [(i + 0.5) * row["bucket"] for i in range(len(row["nll_buckets"]))]
            params = _params(row)
            ax.plot(centres, row["nll_buckets"], marker=".", label=f"{method} ({params})" if params else method)
        ax.set(title=f"{length} tokens", xlabel="position (tokens)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean NLL (nats)")
    figure.suptitle("negative log-likelihood by position")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
