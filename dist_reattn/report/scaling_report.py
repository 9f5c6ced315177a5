"""The Markdown scaling report: tables that name the records behind every number, and the figures.

report = write_report(points, series, out_dir, command="python launch/scaling.py --from runs/a runs/b")
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import scaling_model_report, scaling_plots
from .niah_plots import length_label
from .scaling import (
    PHASE_GROUPS,
    PHASE_RANK_RULE,
    VARIANT_FIELDS,
    Point,
    Series,
    collectives,
    memory,
    phases,
    rank_phases,
    run_commands,
    scope_of,
    scoring_pairs,
    telemetry,
)

SPREAD = 1.2  # trials of one point whose prefill times differ more than this get a note


def _gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _variant_text(points: list[Point]) -> tuple[str, dict[tuple, str]]:
    """(the configuration every point shares, per configuration the fields where it differs)."""
    variants = list(dict.fromkeys(p.variant for p in points))
    same = {f: variants[0][i] for i, f in enumerate(VARIANT_FIELDS) if len({v[i] for v in variants}) == 1}
    common = ", ".join(f"{f}={v}" for f, v in same.items())
    differ = {
        v: ", ".join(f"{f}={v[i]}" for i, f in enumerate(VARIANT_FIELDS) if f not in same) or "-"
        for v in variants
    }
    return common, differ


def _series_table(s: Series) -> list[str]:
    strong = s.kind == "strong"
    header = ["point", "P", "prompt tokens", "trials", "T_P (s), mean [min-max]", "prefill tok/s"]
    if strong:
        header += ["speedup T_b/T_P", "efficiency"]
    else:
        header += ["throughput ratio", "work W_P/W_b", "work per rank vs b", "T_b/T_P (not normalised)"]
        header += ["efficiency (work-normalised)"]
    header += ["correct", "records"]
    rows = []
    for r in s.rows():
        p = r["point"]
        secs = [x["prefill_seconds"] for x in p.records]
        cells = [p.id, p.world, f"{p.tokens:,.0f}", p.trials, f"{p.prefill_s:.1f} [{min(secs):.1f}-{max(secs):.1f}]",
                 f"{p.throughput:,.1f}"]  # fmt: skip
        if strong:
            cells += [f"{r['speedup']:.2f}", f"{r['efficiency']:.2f}"]
        else:
            cells += [f"{r['ratio']:.2f}", f"{r['work']:.2f}", f"{r['work_per_rank']:.2f}", f"{r['raw']:.2f}"]
            cells += [f"{r['efficiency']:.2f}"]
        rows.append([*cells, p.correct, p.source_text()])
    b = s.base
    if strong:
        rule = f"efficiency = P_b * T_b / (P * T_P), speedup = T_b / T_P, baseline b = {b.id} (P={b.world})"
        what = []
    else:
        w = s.work()
        sink, local, chunk = scope_of(b)
        rule = f"efficiency = (W_P / W_b) * P_b * T_b / (P * T_P), work-normalised; baseline b = {b.id} (P={b.world})"
        what = [
            f"Work model W(N) = {w.share:.2f} * T_b * Q(N) / Q(N_b) + {1 - w.share:.2f} * T_b * N / N_b: "
            f"the baseline's scoring share ({w.share:.0%} of its profiled time) grows with Q(N), the "
            f"q.k pairs scored (chunk {chunk}, sink {sink}, local {local}: about (N - sink - local)^2 / 2), "
            "the rest with N. `work per rank vs b` = 1.00 means the run held the work per rank "
            "constant (the usual weak-scaling premise); there the efficiency is the plain T_b / T_P. "
            + (
                "This series grows N as sqrt(P), which holds the quadratic scoring per rank constant."
                if s.growth == "sqrt"
                else "This series grows N proportionally to P: the scoring work per rank grows about "
                "P-fold, so T_b / T_P (not normalised) is not an efficiency."
                if s.growth == "linear"
                else ""
            ),
            "",
        ]
    return [f"### {s.title[0].upper()}{s.title[1:]} ({rule})", "", *what, *_table(header, rows), ""]


def _phase_speedups(s: Series) -> list[str]:
    """Each phase group at each P of the series: seconds and its speedup (strong) or work-normalised
    efficiency (weak), so a reader sees which phases divide."""
    data = [(p, phases(p)) for p in s.points]
    data = [(p, ph) for p, ph in data if ph]
    if len(data) < 2:
        return []
    b, bph = data[0]
    groups = list(dict.fromkeys(g for _, ph in data for g in ph))
    sink, local, chunk = scope_of(b)

    def work(g, n):
        return scoring_pairs(n, sink, local, chunk) if g == "scoring" else n

    rows = []
    for g in groups:
        cells = [g]
        for p, ph in data:
            t, tb = ph.get(g), bph.get(g)
            if t is None:
                cells.append("-")
            elif not tb or t <= 0 or p is b:
                cells.append(f"{t:.2f}")
            elif s.kind == "strong":
                cells.append(f"{t:.2f} (x{tb / t:.2f})")
            else:
                wr = work(g, p.tokens) / work(g, b.tokens) if work(g, b.tokens) else float("nan")
                cells.append(f"{t:.2f} ({wr * b.world * tb / (p.world * t):.2f})")
        rows.append(cells)
    tot = [sum(ph.values()) for _, ph in data]
    rows.append(["total (profiled)", *(f"{t:.2f}" for t in tot)])
    how = (
        f"speedup t_b / t_P in brackets (ideal: P / {b.world}; 1.00 = the phase does not divide)"
        if s.kind == "strong"
        else "work-normalised efficiency (w_P / w_b) * P_b * t_b / (P * t_P) in brackets, with w = the q.k "
        "pairs scored for `scoring` and N for every other phase (ideal 1.00)"
    )
    header = ["phase group", *(f"{p.id} (P={p.world}) s" for p, _ in data)]
    return [
        f"**{s.title[0].upper()}{s.title[1:]}**: rank 0's seconds per phase, {how}. Records: "
        + "; ".join(f"{p.id} {p.source_text()}" for p, _ in data),
        "",
        *_table(header, rows),
        "",
    ]


def _points_table(points: list[Point], differ: dict[tuple, str]) -> list[str]:
    several = len(set(differ.values())) > 1
    layouts = any(p.layout for p in points)
    header = [
        "point",
        *(["config"] if several else []),
        "P",
        "TP",
        *(["layout"] if layouts else []),
        "decode path",
        "length",
        "trials",
        "depths",
    ]
    header.append("T_P (s)")
    header += ["prefill tok/s", "decode ms/token", "correct", "records"]
    rows = []
    for p in points:
        depths = sorted({float(r["depth"]) for r in p.records if "depth" in r})
        decode = p.decode_ms
        rows.append(
            [
                p.id, *([differ[p.variant]] if several else []), p.world, {True: "on", False: "off"}.get(p.tensor_parallel, "-"),
                *([p.layout or "-"] if layouts else []),
                p.decode or "-", length_label(p.length), p.trials,
                ",".join(f"{d:g}" for d in depths), f"{p.prefill_s:.1f}", f"{p.throughput:,.1f}",
                "-" if decode is None else f"{decode:.1f}", p.correct, p.source_text(),
            ]
        )  # fmt: skip
    return _table(header, rows)


def _phase_cells(ph: dict[str, float], groups: list[str]) -> list[str]:
    total = sum(ph.values())
    return [
        f"{total:.1f}",
        *(f"{ph[g]:.1f} ({100 * ph[g] / total:.0f}%)" if g in ph else "-" for g in groups),
    ]


def _phases_section(points: list[Point]) -> list[str]:
    data = [(p, rank_phases(p)) for p in points]
    data = [(p, per) for p, per in data if per]
    if not data:
        return ["No record has a per-phase profile (records from before the profile was added).", ""]
    groups = list(dict.fromkeys(g for _, per in data for ph in per.values() for g in ph))
    rows = [[p.id, *_phase_cells(per[min(per)], groups), p.source_text()] for p, per in data]
    named = ", ".join(f"{g} = {' + '.join(ns)}" for g, ns in PHASE_GROUPS.items())
    out = [
        f"Seconds (share of the profiled total) per phase group: {named}; `comm:<kind>` = time inside "
        f"that collective. Which rank: {PHASE_RANK_RULE}. `model` is everything outside the named phases "
        "(projections, norms, MLP, LM head, Python), including the tensor-parallel all-reduces that "
        "DeepSpeed AutoTP issues inside the model: those are not counted as collectives.",
        "",
        *_table(["point", "profiled s", *groups, "records"], rows),
        "",
    ]
    several = [(p, per) for p, per in data if len(per) > 1]
    if several:
        rows = [
            [p.id, k, *_phase_cells(ph, groups), p.source_text()]
            for p, per in several
            for k, ph in per.items()
        ]
        out += [
            "Every rank, same units:",
            "",
            *_table(["point", "rank", "profiled s", *groups, "records"], rows),
            "",
        ]
    return out


def _collectives_section(points: list[Point]) -> list[str]:
    rows = []
    for p in points:
        c = collectives(p)
        for kind, v in (c or {}).items():
            per_call = v["bytes_rank0"] / v["calls"] if v["calls"] else 0.0
            rows.append(
                [
                    p.id, kind, f"{v['calls']:,.0f}", _mib(v["bytes_rank0"]), _mib(v["bytes_all"]),
                    f"{per_call / 1024:,.2f}", f"{v['per_call'] / 1024:,.2f}",
                    f"{v['bytes_rank0'] / p.tokens:,.1f}", f"{v['bytes_all'] / p.tokens:,.1f}",
                    f"{v['seconds_rank0']:.2f}", p.source_text(),
                ]
            )  # fmt: skip
    if not rows:
        return ["No collectives recorded (P = 1 runs move nothing).", ""]
    header = ["point", "kind", "calls (rank 0)", "MiB rank 0", "MiB all ranks", "KiB/call rank 0"]
    header += ["KiB/call all ranks", "B/token rank 0", "B/token all ranks"]
    return [
        "Per trial (mean over trials), prefill and decode together. Bytes are what each rank contributes to "
        "the collective (its input tensor; an all-to-all: what it sends to the others); `all ranks` sums "
        "them. One call is one layer-chunk (one layer of one prefill chunk, or slab of chunks on a GPU, or "
        "of one decode step) for the engine's per-layer kinds. Per token: over the prompt tokens.",
        "",
        *_table([*header, "s (rank 0)", "records"], rows),
        "",
    ]


def _memory_section(points: list[Point]) -> list[str]:
    rows = []
    for p in points:
        for m in memory(p) or []:
            rows.append(
                [
                    p.id, m["rank"], _gib(m["kv_bytes"]), _gib(m["peak_bytes"]), _gib(m["planned_bytes"]),
                    m.get("plan_device", "-"), p.source_text(),
                ]
            )  # fmt: skip
    if not rows:
        return ["No memory recorded.", ""]
    header = [
        "point",
        "rank",
        "KV cache",
        "peak",
        "planned (KV + weights + activations)",
        "plan device",
        "records",
    ]
    return [
        "Peak: the CUDA caching allocator's peak during the trial on a GPU; on the CPU the process's peak "
        "resident set since it started (weights and earlier trials included). Max over trials.",
        "",
        *_table(header, rows),
        "",
    ]


def _telemetry_section(points: list[Point]) -> list[str]:
    rows, notes = [], {}
    for p in points:
        t = telemetry(p)
        if t["gpu"] is None:
            notes[p.id] = t["note"]
            continue
        for r in t["ranks"]:
            rows.append(
                [
                    p.id, r["rank"], r["gpu"],
                    "-" if r["power_w_mean"] is None else f"{r['power_w_mean']:.0f}",
                    "-" if r["power_w_max"] is None else f"{r['power_w_max']:.0f}",
                    "-" if r["util_mean_pct"] is None else f"{r['util_mean_pct']:.0f}",
                    _gib(r["memory_used_max_bytes"]), p.source_text(),
                ]
            )  # fmt: skip
    out = []
    if rows:
        header = ["point", "rank", "GPU", "power W mean", "power W max", "util % mean", "memory used max"]
        out += ["Sampled through NVML while each trial ran; means over trials.", ""]
        out += [*_table([*header, "records"], rows), ""]
    if notes:
        by_note: dict[str, list[str]] = {}
        for k, v in notes.items():
            by_note.setdefault(v if "no GPU telemetry" in v else f"no GPU telemetry: {v}", []).append(k)
        out += [f"* {', '.join(ids)}: {note}" for note, ids in by_note.items()]
        out.append("")
    return out


def write_report(
    points: list[Point],
    series: list[Series],
    out: str | os.PathLike,
    command: str,
    dirs: list[str],
    notes: list[str] = (),
    run_cmds: list[tuple[str, str, bool]] | None = None,
    model_options: dict | None = None,
) -> Path:
    """Writes ``OUT/report.md`` and its PNGs (``scaling.png``, ``phases.png``, ``collectives.png``, ``memory.png``).

    Args:
        points: every measured point (see :func:`scaling.load_points`).
        series: strong and weak series over those points.
        out: output directory (created).
        command: the exact command line that produced the report.
        dirs: the run directories read.
        notes: lines for the notes section (skipped records, host remarks).
        run_cmds: (dir, command, exact?) per run directory; default: :func:`scaling.run_commands`.
        model_options: the cost model's options (see :func:`scaling_model_report.model_section`);
            None: the defaults (fit on P = 1, 2, project P = 1, 2, 4, 8 at the largest length).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common, differ = _variant_text(points)
    if len(differ) > 1:
        for s in series:
            s.tag = differ[s.base.variant]
    lines = [
        "# Scaling report",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `{command}`.",
        "",
        f"Configuration shared by every point: {common}. Points are named `p<P>-<length>`"
        + (" with `-c<n>` for the n-th configuration" if len(differ) > 1 else "")
        + "; every table names the `file:line` of the records behind each row.",
        "",
        "Definitions: T_P = mean over the point's trials of `prefill_seconds` (wall time of the whole "
        "prefill on rank 0; a prefill ends when every rank has finished). Throughput = mean prompt "
        "tokens / T_P. Strong scaling (fixed length): speedup = T_b / T_P, efficiency = "
        "P_b * T_b / (P * T_P). Weak scaling (the length grows with P): the scoring is quadratic in the "
        "length N, so the efficiency is normalised by work, efficiency = (W_P / W_b) * P_b * T_b / "
        "(P * T_P) with W the quadratic-plus-linear work model given under each weak table; a series "
        "that grows N as sqrt(P) holds the scoring work per rank constant and there it is the plain "
        "T_b / T_P. A series at N proportional to P does about P times the scoring work per rank, and "
        "its T_b / T_P (shown, not normalised) is not an efficiency. The baseline b is the smallest P "
        "of the series (P_b = 1 when the series has a P = 1 run). Projections of the cost model are "
        "never mixed into these tables: they have their own section, labelled.",
        "",
        "## Scaling",
        "",
    ]
    if series:
        for s in series:
            lines += _series_table(s)
        scaling_plots.plot_scaling(series, out / "scaling.png")
        lines += ["![throughput and efficiency against P](scaling.png)", ""]
    else:
        lines += [
            "No series: the records do not hold one length (or one length per rank) at two or more P.",
            "",
        ]
    lines += ["## Every measured point", "", *_points_table(points, differ), ""]
    lines += ["## Prefill time per phase", "", *_phases_section(points)]
    if scaling_plots.plot_phases(points, out / "phases.png"):
        lines += ["![prefill time per phase](phases.png)", ""]
    divided = [line for s in series for line in _phase_speedups(s)]
    if divided:
        lines += ["### Which phases divide", "", *divided]
    lines += ["## Collectives", "", *_collectives_section(points)]
    if scaling_plots.plot_collectives(points, out / "collectives.png"):
        lines += ["![bytes per collective kind](collectives.png)", ""]
    lines += scaling_model_report.model_section(points, out, model_options or {})
    lines += ["## Memory per rank", "", *_memory_section(points)]
    if scaling_plots.plot_memory(points, out / "memory.png"):
        lines += ["![memory per rank](memory.png)", ""]
    lines += ["## GPU power and utilization", "", *_telemetry_section(points)]
    lines += ["## Commands", "", "This report:", "", "```bash", command, "```", ""]
    cmds = run_cmds if run_cmds is not None else run_commands(dirs)
    if cmds:
        lines += [
            "The runs (from `DIR/command.txt` where launch/scaling.py wrote one, else rebuilt from the "
        ]
        lines += ["records' fields, with `--max-new-tokens` and `--cache.page` at their defaults):", ""]
        for d, cmd, exact in cmds:
            lines += [
                f"* `{d}` ({'as run' if exact else 'rebuilt from the records'}):",
                "",
                "  ```bash",
                f"  {cmd}",
                "  ```",
                "",
            ]
    cpu_multi = sorted(
        {p.id for p in points if p.variant[VARIANT_FIELDS.index("device")] == "cpu" and p.world > 1}
    )
    notes = list(notes)
    for p in points:
        secs = [r["prefill_seconds"] for r in p.records]
        if len(secs) > 1 and max(secs) > SPREAD * min(secs):
            notes.append(
                f"{p.id}: its trials' prefill times differ by {100 * (max(secs) / min(secs) - 1):.0f}% "
                f"({min(secs):.1f}-{max(secs):.1f} s) at one length: look for contention on the host"
            )
    if cpu_multi:
        notes.append(
            f"CPU points with several ranks ({', '.join(cpu_multi)}): all ranks of a run share one host's "
            "cores, and the records do not say how many; where P ranks outnumber the cores, time per rank "
            "includes waiting for a core."
        )
    if notes:
        lines += ["## Notes", "", *(f"* {n}" for n in notes), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
