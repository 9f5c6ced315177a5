"""Figures of a scaling report (matplotlib, Agg): scaling curves, phases, collectives, memory.

Each figure is drawn from :mod:`dist_reattn.report.scaling` points and carries, along its bottom edge,
the ids of the points it shows and the ``file:line`` of their records, so a PNG read on its own still
says where its numbers come from.
"""

from __future__ import annotations

import os
import textwrap

from .niah_plots import length_label
from .scaling import Point, Series, collectives, compress_sources, memory, phases

GIB = 2**30
# Fixed colours for compute phases; collective kinds take colours from a qualitative map.
PHASE_COLOURS = {"scoring": "#d62728", "selection": "#ff7f0e", "attention": "#2ca02c", "model": "#1f77b4"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, points: list[Point], path: str | os.PathLike) -> None:
    """Writes the figure with its data sources along the bottom, below the axes."""
    sources = compress_sources([s for p in points for s in p.sources])
    text = "data: " + ", ".join(p.id for p in points) + " from " + sources
    lines = textwrap.wrap(text, int(fig.get_figwidth() * 20))  # about 20 characters of 6 pt per inch
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=6, va="bottom", ha="left", color="#555555")
    bottom = (9 * len(lines) + 8) / (72 * fig.get_figheight())  # 9 pt per line, as a figure fraction
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_scaling(series: list[Series], path: str | os.PathLike) -> None:
    """Throughput and efficiency against P, one line per series, with the ideal as a dotted line.

    Args:
        series: strong and weak series (at least one).
        path: the PNG to write.
    """
    plt = _plt()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    points = []
    for s in series:
        rows = s.rows()
        ps = [r["point"].world for r in rows]
        line = ax_t.plot(ps, [r["point"].throughput for r in rows], marker="o", label=s.title)[0]
        b = s.base
        ax_t.plot(ps, [b.throughput * p / b.world for p in ps], ls=":", color=line.get_color())
        ax_e.plot(ps, [r["efficiency"] for r in rows], marker="o", color=line.get_color(), label=s.title)
        for r in rows:
            ax_e.annotate(
                f"{r['efficiency']:.2f}", (r["point"].world, r["efficiency"]), textcoords="offset points",
                xytext=(4, 4), fontsize=8,
            )  # fmt: skip
        points += [p for p in s.points if p not in points]
    worlds = sorted({p.world for p in points})
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("ranks P")
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("prefill tokens/s")
    ax_t.set_title("throughput (dotted: ideal, linear in P)")
    ax_e.axhline(1.0, ls=":", color="gray")
    ax_e.set_ylim(0, max(1.1, max(r["efficiency"] for s in series for r in s.rows()) * 1.1))
    ax_e.set_ylabel("efficiency")
    ax_e.set_title("efficiency: strong P_b*T_b/(P*T_P), weak work-normalised", fontsize=10)
    ax_t.legend(fontsize=8)
    _save(fig, points, path)


def plot_phases(points: list[Point], path: str | os.PathLike) -> bool:
    """Stacked prefill seconds per phase group, one bar per point (rank 0; see scaling.PHASE_RANK_RULE).

    Returns:
        False (and writes nothing) when no point has a profile.
    """
    data = [(p, phases(p)) for p in points]
    data = [(p, ph) for p, ph in data if ph]
    if not data:
        return False
    plt = _plt()
    groups = list(dict.fromkeys(g for _, ph in data for g in ph))
    comm = [g for g in groups if g not in PHASE_COLOURS]
    # tab10 after its first four (taken by the compute phases), then tab20b: distinct hues for the kinds.
    palette = [plt.get_cmap("tab10")(i) for i in range(4, 10)] + [
        plt.get_cmap("tab20b")(i) for i in range(0, 20, 4)
    ]
    colours = {**PHASE_COLOURS, **{g: palette[i % len(palette)] for i, g in enumerate(comm)}}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(data) + 3), 4.8), layout="constrained")
    bottom = [0.0] * len(data)
    x = range(len(data))
    for g in groups:
        h = [ph.get(g, 0.0) for _, ph in data]
        ax.bar(x, h, bottom=bottom, color=colours[g], label=g, width=0.6)
        bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    for i, (p, _) in enumerate(data):
        ax.annotate(
            f"{bottom[i]:.0f} s\n(wall {p.prefill_s:.0f})",
            (i, bottom[i]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(list(x), [f"{p.label}\n{p.id}" for p, _ in data], fontsize=8)
    ax.set_ylabel("prefill seconds (rank 0, mean over trials)")
    ax.set_ylim(0, max(bottom) * 1.15)
    ax.set_title("prefill time per phase")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, [p for p, _ in data], path)
    return True


def plot_collectives(points: list[Point], path: str | os.PathLike) -> bool:
    """Bytes per collective kind per point (summed over ranks), and bytes per call.

    Returns:
        False (and writes nothing) when no point moved any bytes (P = 1 only, or nothing recorded).
    """
    data = [(p, collectives(p)) for p in points]
    data = [(p, c) for p, c in data if c and any(v["bytes_all"] for v in c.values())]
    if not data:
        return False
    plt = _plt()
    kinds = sorted({k for _, c in data for k, v in c.items() if v["bytes_all"]})
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    width = 0.8 / len(kinds)
    cmap = plt.get_cmap("tab10")
    for j, k in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(data))]
        ax_b.bar(
            xs, [c.get(k, {}).get("bytes_all", 0) / 2**20 for _, c in data], width, label=k, color=cmap(j)
        )
        ax_c.bar(
            xs, [c.get(k, {}).get("per_call", 0) / 2**10 for _, c in data], width, label=k, color=cmap(j)
        )
    for ax in (ax_b, ax_c):
        ax.set_xticks(range(len(data)), [f"{p.label}\n{p.id}" for p, _ in data], fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    ax_b.set_ylabel("MiB per trial, all ranks")
    ax_b.set_title("bytes contributed per collective kind")
    ax_c.set_ylabel("KiB per call (one call per layer-chunk)")
    ax_c.set_title("bytes per call, all ranks")
    ax_c.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, [p for p, _ in data], path)
    return True


def plot_memory(points: list[Point], path: str | os.PathLike) -> bool:
    """Per point: KV bytes per rank, peak memory (largest rank) and the planned total per rank.

    Returns:
        False (and writes nothing) when no point recorded memory.
    """
    data = [(p, memory(p)) for p in points]
    data = [(p, m) for p, m in data if m]
    if not data:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(data) + 3), 4.6), layout="constrained")
    bars = [
        ("KV cache per rank", lambda m: max(r["kv_bytes"] for r in m)),
        ("peak memory (largest rank)", lambda m: max(r["peak_bytes"] for r in m)),
        ("planned per rank (KV + weights + activations)", lambda m: max(r["planned_bytes"] or 0 for r in m)),
    ]
    width = 0.8 / len(bars)
    for j, (name, fn) in enumerate(bars):
        xs = [i + (j - 1) * width for i in range(len(data))]
        ax.bar(xs, [fn(m) / GIB for _, m in data], width, label=name)
    ax.set_xticks(range(len(data)), [f"{p.label}\n{p.id}" for p, _ in data], fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.set_title("memory per rank")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    _save(fig, [p for p, _ in data], path)
    return True


def plot_projection(projected: list[tuple], path: str | os.PathLike) -> bool:
    """Projected prefill time and efficiency against P, one line per (configuration, length), dashed and
    labelled "projection (cost model fitted on P=..)"; measured points at the same (length, P) drawn
    as filled markers beside them, never joined to the projection.

    Args:
        projected: ``(fit, length, rows)`` from :func:`scaling_model_report.projections`.
        path: the PNG to write.

    Returns:
        False (and writes nothing) when there is nothing to draw.
    """
    if not projected:
        return False
    plt = _plt()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    worlds, points = set(), []
    for f, n, rows in projected:
        ps = [r["world"] for r in rows]
        worlds |= set(ps)
        name = f"{f.tag} {length_label(n)}"
        line = ax_t.plot(
            ps,
            [r["model"]["total"] for r in rows],
            ls="--",
            marker="o",
            mfc="none",
            label=f"{name}: {f.label}",
        )[0]
        ax_e.plot(
            ps, [r["efficiency"] for r in rows], ls="--", marker="o", mfc="none", color=line.get_color()
        )
        meas = [r for r in rows if "measured" in r]
        if meas:
            ax_t.plot(
                [r["world"] for r in meas], [r["measured"]["seconds"] for r in meas], ls="none", marker="s",
                color=line.get_color(), label=f"{name}: measured",
            )  # fmt: skip
            eff = [r for r in meas if r["measured"]["efficiency"] is not None]
            ax_e.plot(
                [r["world"] for r in eff], [r["measured"]["efficiency"] for r in eff], ls="none", marker="s",
                color=line.get_color(),
            )  # fmt: skip
        ax_t.plot(
            ps, [r["achieved"]["total"] for r in rows], ls=":", marker="^", mfc="none", color=line.get_color(),
            label=f"{name}: projection, collectives at achieved bw",
        )  # fmt: skip
        seen = f.points + [q for r in meas for q in r["measured"]["points"]]
        points += [p for p in seen if p not in points]
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(worlds), [str(w) for w in sorted(worlds)])
        ax.set_xlabel("ranks P")
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("prefill seconds")
    ax_t.set_title(
        "hollow (dashed: bench bw, dotted: achieved bw): PROJECTION; squares: measured", fontsize=9
    )
    ax_e.axhline(1.0, ls=":", color="gray")
    ax_e.set_ylim(0, 1.1)
    ax_e.set_ylabel("strong efficiency T_1/(P*T_P)")
    ax_e.set_title("projected efficiency (model T_1); squares: measured", fontsize=10)
    ax_t.legend(fontsize=6)
    _save(fig, points, path)
    return True
