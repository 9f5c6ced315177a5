"""RULER reports: a score table per task x length x mode with the model's own ceiling, and a line plot.

Records are as ``launch/ruler.py`` writes them: at least task, len (the requested length), mode and
score (in [0, 1]). Scores are shown as RULER shows them, the mean over samples times 100.
Retention is a cell's mean score divided by the same task's mean score at the in-window ceiling
length in full attention: a task the model cannot do even inside its window says nothing about the
method, and retention shows the rest.

    python -m dist_reattn.report.ruler_report OUT/results.jsonl --ceiling 4K
    python -m dist_reattn.report.ruler_report answers.jsonl   # launch/batch.py answers to RULER tasks
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from .niah_plots import length_label
from .results import read_records


def _cells(records: list[dict]) -> dict[tuple[str, int, str], list[float]]:
    """(task, len, mode) -> scores, in record order."""
    cells: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in records:
        cells[(r["task"], int(r["len"]), r["mode"])].append(float(r["score"]))
    return cells


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def retention(records: list[dict], ceiling: int) -> dict[tuple[str, int, str], float | None]:
    """(task, len, mode) -> mean score / the task's mean score at ``ceiling`` in full attention.

    None where the ceiling cell is missing or scored 0 (nothing to retain).
    """
    cells = _cells(records)
    out = {}
    for (task, n, mode), scores in cells.items():
        top = _mean(cells.get((task, ceiling, "full"), []))
        out[(task, n, mode)] = None if not top else _mean(scores) / top
    return out


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _order(records: list[dict], field: str) -> list:
    return list(dict.fromkeys(r[field] for r in records))


def summary_table(records: list[dict], ceiling: int | None) -> str:
    """Markdown table: one row per task x length x mode, then the mean over tasks per length x mode.

    Columns: task, length, mode, score (mean x 100), samples, retention (score / the task's full
    attention score at ``ceiling``; "-" where there is none), mean seconds per sample, and where
    records carry ``scope_recall`` (``ruler.py --recall``) the mean over samples and layers of the
    fraction of the answer's tokens in the scope that chose the first answer token ("-": no scope
    recorded, every token attended).

    Args:
        records: RULER sample records.
        ceiling: the in-window length run in full attention, or None for no retention column values.

    Returns:
        The table, or "(no RULER records)".
    """
    if not records:
        return "(no RULER records)"
    cells = _cells(records)
    kept = retention(records, ceiling) if ceiling is not None else {}
    seconds: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    recall: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get("seconds") is not None:
            seconds[(r["task"], int(r["len"]), r["mode"])].append(float(r["seconds"]))
        if r.get("scope_recall"):
            recall[(r["task"], int(r["len"]), r["mode"])].append(_mean(r["scope_recall"]))
    tasks, modes = _order(records, "task"), _order(records, "mode")
    lengths = sorted({int(r["len"]) for r in records})
    header = ["task", "len", "mode", "score", "n", "retention", "s/sample"] + (["recall"] if recall else [])
    rows = []
    for task in tasks:
        for n in lengths:
            for mode in modes:
                if (task, n, mode) not in cells:
                    continue
                s, ret = cells[(task, n, mode)], kept.get((task, n, mode))
                sec = _mean(seconds[(task, n, mode)])
                rows.append(
                    [
                        task,
                        length_label(n),
                        mode,
                        f"{100 * _mean(s):.1f}",
                        str(len(s)),
                        _format(ret),
                        "-" if sec is None else f"{sec:.1f}",
                    ]
                    + ([_format(_mean(recall[(task, n, mode)]))] if recall else [])
                )
    for n in lengths:
        for mode in modes:
            means = [_mean(cells[(t, n, mode)]) for t in tasks if (t, n, mode) in cells]
            if len(tasks) > 1 and means:
                rets = [kept.get((t, n, mode)) for t in tasks if (t, n, mode) in cells]
                rets = [x for x in rets if x is not None]
                rows.append(
                    [
                        f"mean of {len(means)} tasks",
                        length_label(n),
                        mode,
                        f"{100 * sum(means) / len(means):.1f}",
                        "",
                        f"{sum(rets) / len(rets):.2f}" if rets else "-",
                        "",
                    ]
                    + ([""] if recall else [])
                )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_scores(records: list[dict], path: str | os.PathLike, ceiling: int | None = None) -> None:
    """Save a line plot per mode, side by side: score (x 100) against length, one line per task.

    The ceiling length's full-attention scores appear in the "full" panel like any other point.

    Args:
        records: RULER sample records (at least one).
        path: where to write the PNG.
        ceiling: drawn as a dotted vertical line where given.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no RULER records to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(records)
    tasks, modes = _order(records, "task"), _order(records, "mode")
    lengths = sorted({int(r["len"]) for r in records})
    fig, axes = plt.subplots(
        1, len(modes), figsize=(1.5 + 4.2 * len(modes), 4.2), squeeze=False, sharey=True, layout="constrained"
    )
    cmap = plt.get_cmap("tab20")
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, task in enumerate(tasks):
            xs = [j for j, n in enumerate(lengths) if (task, n, mode) in cells]
            ys = [100 * _mean(cells[(task, lengths[j], mode)]) for j in xs]
            if xs:
                ax.plot(xs, ys, marker="o", color=cmap(i % 20), label=task)
        if ceiling in lengths:
            ax.axvline(lengths.index(ceiling), color="grey", linestyle=":", linewidth=1)
        ax.set_title(mode)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (string match, x100)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _from_batch(record: dict) -> dict | None:
    """A launch/batch.py answer record of a RULER task (see make_batch_tasks --task ruler), scored."""
    from ..tasks.ruler import score

    meta = record.get("meta") or {}
    if not isinstance(meta, dict) or "answers" not in meta or "answer" not in record:
        return None
    return {
        "task": meta["task"],
        "len": meta["target_len"],
        "mode": record.get("mode", "?"),
        "score": score(record["answer"], meta["answers"], meta["metric"]),
        "seconds": record.get("seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    from ..config import parse_count

    p = argparse.ArgumentParser(description="RULER table (markdown) from a results.jsonl")
    p.add_argument("results")
    p.add_argument("--ceiling", default="4K", help="in-window length run in full attention, or 'none'")
    p.add_argument("--plot", default=None, help="also write the line plot here (PNG)")
    args = p.parse_args(argv)
    records = [_from_batch(r) if "meta" in r else r for r in read_records(args.results)]
    records = [r for r in records if r and "task" in r and "score" in r]
    ceiling = None if args.ceiling == "none" else parse_count(args.ceiling)
    print(summary_table(records, ceiling))
    if args.plot and records:
        plot_scores(records, args.plot, ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
