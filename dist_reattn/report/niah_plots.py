"""NIAH reports: a text summary table and an accuracy heatmap per mode.

Both read trial records as written by `dist_reattn.report.results.append_record`, with at least the
keys mode, len (prompt tokens), target_len (requested length), depth, correct, answer and seconds, and
optionally prefill_tok_s. Trials are grouped by the requested length, since the prompt itself may be a
few tokens shorter.
"""

from __future__ import annotations

import os
from collections import defaultdict


def length_label(n: int) -> str:
    """Short label of a token count: 16K for 16384, 4M for 4194304, else the number itself.

    Args:
        n: a length in tokens.

    Returns:
        The label.
    """
    for unit, suffix in ((1024 * 1024, "M"), (1024, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _target(record: dict) -> int:
    return int(record.get("target_len", record["len"]))


def _modes(records: list[dict]) -> list[str]:
    """Modes in order of first appearance: a run's own order (full, streaming, reattention) reads best."""
    return list(dict.fromkeys(r["mode"] for r in records))


def _tally(records: list[dict]) -> dict[tuple[str, int, float], list[int]]:
    """(mode, target_len, depth) -> [correct, trials]."""
    cells: dict[tuple[str, int, float], list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        cell = cells[(r["mode"], _target(r), float(r["depth"]))]
        cell[0] += bool(r["correct"])
        cell[1] += 1
    return cells


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_table(records: list[dict]) -> str:
    """Fixed-width table: one row per (mode, requested length), accuracy per depth and overall.

    Columns: mode, target length, "k/n" correct per depth, "k/n" over all depths, mean seconds per
    trial, and mean prefill tokens/s when any record has "prefill_tok_s".

    Args:
        records: NIAH trial records.

    Returns:
        The table as text, one line per row after a header, or "(no NIAH records)".
    """
    if not records:
        return "(no NIAH records)"
    cells = _tally(records)
    depths = sorted({float(r["depth"]) for r in records})
    with_rate = any("prefill_tok_s" in r for r in records)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["mode"], _target(r))].append(r)

    header = ["mode", "len", *(f"d={d:g}" for d in depths), "all", "s/trial"]
    if with_rate:
        header.append("prefill tok/s")
    rows = []
    for mode in _modes(records):
        for target in sorted(t for m, t in groups if m == mode):
            group = groups[(mode, target)]
            row = [mode, length_label(target)]
            for d in depths:
                ok, n = cells.get((mode, target, d), (0, 0))
                row.append(f"{ok}/{n}" if n else "-")
            row.append(f"{sum(bool(r['correct']) for r in group)}/{len(group)}")
            seconds = _mean([float(r["seconds"]) for r in group if r.get("seconds") is not None])
            row.append("-" if seconds is None else f"{seconds:.1f}")
            if with_rate:
                rate = _mean([float(r["prefill_tok_s"]) for r in group if r.get("prefill_tok_s") is not None])
                row.append("-" if rate is None else f"{rate:,.0f}")
            rows.append(row)

    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in rows)])


def plot_heatmap(records: list[dict], path: str | os.PathLike) -> None:
    """Save an accuracy heatmap per mode, side by side, as a PNG.

    Each subplot: x = requested length (categorical), y = needle depth (0 at the top), colour =
    accuracy from red (0) to green (1), each cell annotated "k/n"; cells with no trials stay blank.

    Args:
        records: NIAH trial records (at least one).
        path: where to write the PNG.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no NIAH records to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = _tally(records)
    modes = _modes(records)
    targets = sorted({_target(r) for r in records})
    depths = sorted({float(r["depth"]) for r in records})
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")

    fig, axes = plt.subplots(
        1,
        len(modes),
        figsize=(1.6 + 0.75 * len(targets) * len(modes) + 0.6 * len(modes), 1.4 + 0.45 * len(depths)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, mode in zip(axes[0], modes, strict=True):
        acc = np.full((len(depths), len(targets)), np.nan)
        for i, d in enumerate(depths):
            for j, t in enumerate(targets):
                ok, n = cells.get((mode, t, d), (0, 0))
                if n:
                    acc[i, j] = ok / n
                    lum = np.dot(cmap(ok / n)[:3], (0.299, 0.587, 0.114))
                    color = "black" if lum > 0.5 else "white"
                    ax.text(j, i, f"{ok}/{n}", ha="center", va="center", fontsize=9, color=color)
        image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(mode)
        ax.set_xticks(range(len(targets)), [length_label(t) for t in targets])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_xticks(np.arange(len(targets) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(depths) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
