"""The cost-model section of a scaling report: benchmarks, the fit, bytes per collective, projections.

lines = model_section(points, out_dir, {"fit_ranks": [1, 2], "project_ranks": [1, 2, 4, 8],
                                        "targets": {"smollm2-135m": [4 * 2**20]}, "benches": [...]})

Projections sit in their own tables and figure, each row and line labelled "projection (cost model
fitted on P=..)"; where a measured point exists at a projected (length, P), it is shown beside the
projection with the model's error, never in its place.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import scaling_plots
from .niah_plots import length_label
from .scaling import VARIANT_FIELDS, Point, ScalingError, compress_sources
from .scaling_model import Fit, bus_bytes, comm_rates, fit, project, raw_phases


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _tag(variant: tuple) -> str:
    v = dict(zip(VARIANT_FIELDS, variant, strict=True))
    return f"{v['model']}, {v['device']}, {v['dtype']}"


def _gbps(bps: float) -> str:
    if bps == float("inf"):
        return "inf"
    return f"{bps / 1e9:,.1f}" if bps >= 10e9 else f"{bps / 1e9:.3g}"


def fits_of(points: list[Point], options: dict) -> tuple[list[Fit], list[str]]:
    """The cost model of every configuration with profiled points at two or more of the fit ranks."""
    fit_ranks = set(options.get("fit_ranks") or [1, 2])
    by_variant: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        by_variant[p.variant].append(p)
    fits, notes = [], []
    for variant, group in by_variant.items():
        use = [p for p in group if p.world in fit_ranks and raw_phases(p)]
        if len({p.world for p in use}) < 2:
            if len({p.world for p in group}) >= 2:
                notes.append(
                    f"{_tag(variant)}: no cost model, profiled points at fewer than two of P={','.join(map(str, sorted(fit_ranks)))}"
                )
            continue
        every = [*points, *(options.get("references") or [])]
        try:
            fits.append(fit(use, every, options.get("benches") or [], options.get("ops"), _tag(variant)))
        except ScalingError as e:
            notes.append(str(e))
    return fits, notes


def _targets(fits: list[Fit], options: dict) -> list[tuple[Fit, int]]:
    targets = options.get("targets") or {}
    if not targets:
        return [(f, max(p.length for p in f.points)) for f in fits]
    out = []
    for model, lens in targets.items():
        mine = [f for f in fits if f.model_name == model]
        gpu = [f for f in mine if str(f.variant[VARIANT_FIELDS.index("device")]).startswith("cuda")]
        out += [(f, n) for f in (gpu or mine) for n in lens]
    return out


def _measured(points: list[Point], f: Fit, n: int, world: int) -> list[Point]:
    return [p for p in points if p.variant == f.variant and p.world == world and p.length == n]


def projections(points: list[Point], f: Fit, n: int, ranks: list[int]) -> list[dict]:
    """Rows of the projection table for one configuration and length: the model at each P, and the
    measured points there (model evaluated at their own prompt tokens for the error)."""
    t1 = project(f, n, 1)["total"]
    rows = []
    for world in ranks:
        pr = project(f, n, world)
        meas = _measured(points, f, n, world)
        m1 = _measured(points, f, n, 1)
        slow = project(f, n, world, achieved=True)["total"]
        row = {"world": world, "n": n, "model": pr, "t1": t1, "efficiency": t1 / (world * pr["total"])}
        row["achieved"] = {"total": slow, "efficiency": t1 / (world * slow)}
        if meas:
            t = sum(p.prefill_s for p in meas) / len(meas)
            at = project(f, sum(p.tokens for p in meas) / len(meas), world)["total"]
            row["measured"] = {
                "seconds": t,
                "error": (at - t) / t,
                "in_fit": any(p in f.points for p in meas),
                "efficiency": (m1[0].prefill_s / (world * t)) if m1 else None,
                "sources": compress_sources([s for p in meas for s in p.sources]),
                "points": meas,
            }
        rows.append(row)
    return rows


def _bench_lines(benches) -> list[str]:
    if not benches:
        return [
            "No `--comm-bench` given: collectives are projected at the effective bus bandwidth each "
            "configuration achieved at its largest measured P (waiting included), not at the fabric's.",
            "",
        ]
    rows = []
    for b in benches:
        for op, v in b.ops.items():
            rows.append(
                [
                    op, b.world, b.backend, b.device, f"{v['latency_s'] * 1e6:,.1f}", _gbps(v["busbw_Bps"]),
                    _gbps(v.get("peak_busbw_Bps", v["busbw_Bps"])), len(v.get("points", [])), b.path,
                ]
            )  # fmt: skip
    header = ["op", "P", "backend", "device", "latency us", "bus GB/s (fit)", "bus GB/s (peak)", "sizes"]
    return [
        "Measured by `launch/bench_comm.py` (nccl-tests' bus bandwidth; t = latency + bus bytes / "
        "bandwidth fitted over the size sweep, in relative error):",
        "",
        *_table([*header, "file"], rows),
        "",
    ]


def _reference_lines(refs: list[Point]) -> list[str]:
    """The byte-reference points: calls and bytes per prompt token of every kind, rank 0."""
    if not refs:
        return []
    rows = []
    for p in refs:
        v = dict(zip(VARIANT_FIELDS, p.variant, strict=True))
        ran = p.records[0].get("model")
        for kind, r in sorted(comm_rates(p).items()):
            rows.append(
                [
                    p.id, ran if ran == v["model"] else f"{ran} (for {v['model']})", f"{v['device']}, {v['dtype']}",
                    p.world, p.layout or "-", f"{p.tokens:,.0f}", kind, f"{r['calls_per_token'] * p.tokens:,.0f}",
                    f"{r['calls_per_token']:.4f}", f"{r['bytes_per_token']:,.1f}", p.source_text(),
                ]
            )  # fmt: skip
    header = ["reference", "model", "device, dtype", "P", "layout", "prompt tokens", "kind", "calls (rank 0)"]
    header += ["calls/token", "B/token (rank 0)", "records"]
    return [
        "### Byte reference",
        "",
        "Runs read only for their collective counts (`--bytes-reference`; their times are not used, nor "
        "shown in the measured tables): rank 0's calls and bytes per prompt token of each kind, over the "
        "trial (prefill and decode). A configuration's bytes at a P it was not measured at are its own "
        "at its largest measured P times the reference's ratio between the two P at one length.",
        "",
        *_table(header, rows),
        "",
    ]


def _fit_lines(f: Fit) -> list[str]:
    n = max(p.tokens for p in f.points)
    rows = [
        [
            ph.phase, ph.shape, f"{ph.divides:.3e}", f"{ph.repeats:.3e}", f"{ph.divided_share(n, f.scope):.0%}",
            f"{ph.residual:.1%}",
        ]
        for ph in f.phases
    ]  # fmt: skip
    src = "; ".join(f"{p.id} {p.source_text()}" for p in f.points)
    out = [
        f"#### {f.tag}: compute phases, t = a * w / P + b * w (fitted on {', '.join(p.id for p in f.points)}; {src})",
        "",
        *_table(["phase", "w", "a (divides)", "b (every rank)", f"divided share at {length_label(round(n))}", "max fit error"], rows),
        "",
    ]  # fmt: skip
    rows = []
    for kind, rates in f.comm.kinds.items():
        for world, r in sorted(rates.items()):
            counted = r["bytes_per_token"] * r["tokens"]
            bus = bus_bytes(f.comm.ops[kind], world, counted)
            model = project(f, r["tokens"], world)["comm"].get(kind, {})
            rows.append(
                [
                    kind, f.comm.ops[kind], world, f"{r['calls_per_token'] * r['tokens']:,.0f}",
                    f"{counted / max(r['calls_per_token'] * r['tokens'], 1) / 1024:,.1f}",
                    f"{r['bytes_per_token']:,.1f}", f"{r['seconds']:.2f}", f"{model.get('seconds', 0):.2f}",
                    _gbps(bus / r["seconds"]) if r["seconds"] > 0 else "-",
                    "prefill" if r["prefill_only"] else "trial (prefill + decode)",
                ]
            )  # fmt: skip
    if rows:
        header = ["kind", "op", "P", "calls (rank 0)", "KiB/call (rank 0)", "B/token (rank 0)"]
        header += ["measured s (prefill)", "model s", "achieved bus GB/s", "counts over"]
        out += [
            f"Collectives of {f.tag} at the fit points: the model's seconds are calls * latency + bus bytes "
            "/ bandwidth; measured seconds include waiting for the slowest rank.",
            "",
            *_table(header, rows),
            "",
        ]
    out += [f"* {n}" for n in f.comm.op_notes]
    return out


def _projection_lines(points: list[Point], f: Fit, n: int, ranks: list[int]) -> tuple[list[str], list[dict]]:
    rows_data = projections(points, f, n, ranks)
    groups = list(dict.fromkeys(k for r in rows_data for k in r["model"]["phases"]))
    compute = [g for g in groups if not g.startswith("comm:")]
    rows = []
    for r in rows_data:
        ph = r["model"]["phases"]
        comm = sum(v for k, v in ph.items() if k.startswith("comm:"))
        m = r.get("measured")
        rows.append(
            [
                f.label, r["world"], f"{r['model']['total']:,.1f}",
                *(f"{ph.get(g, 0.0):,.1f}" for g in compute), f"{comm:,.1f}", f"{r['efficiency']:.2f}",
                f"{r['achieved']['total']:,.1f} ({r['achieved']['efficiency']:.2f})",
                "-" if not m else f"{m['seconds']:,.1f}" + (" (in fit)" if m["in_fit"] else " (held out)"),
                "-" if not m else f"{m['error']:+.1%}",
                "-" if not m or m["efficiency"] is None else f"{m['efficiency']:.2f}",
                "-" if not m else m["sources"],
            ]
        )  # fmt: skip
    header = ["what", "P", "projected T_P (s)", *(f"{g} s" for g in compute), "collectives s"]
    header += ["projected efficiency T_1/(P*T_P)", "projected T_P (efficiency), collectives at achieved bw"]
    header += ["measured T_P (s)", "model error", "measured efficiency"]
    header.append("measured records")
    out = [
        f"#### {f.tag} at {length_label(n)}: {f.label}",
        "",
        f"Projected efficiency uses the model's own T_1 at {length_label(n)} ({rows_data[0]['t1']:,.1f} s). "
        "Collectives are added to compute (no overlap assumed), timed at the benchmark's bandwidth (the "
        "fabric's: optimistic where the engine waits or overheads dominate) and, in the next column, at the "
        "bus bandwidth the configuration achieved at its largest measured P (waits included: pessimistic). "
        "Measured columns come from the records "
        "named; `model error` = (model - measured) / measured, with the model at the measured prompt "
        "tokens.",
        "",
        *_table(header, rows),
        "",
    ]
    detail = []
    for r in rows_data:
        for kind, c in r["model"]["comm"].items():
            detail.append(
                [
                    r["world"], kind, c["op"], f"{c['calls']:,.0f}", f"{c['bytes'] / 2**20:,.1f}",
                    f"{c['bus_bytes'] / 2**20:,.1f}", f"{c['latency_s'] * 1e6:,.1f}", _gbps(c["busbw_Bps"]),
                    f"{c['seconds']:.2f}", c["rates"], c["bandwidth"],
                ]
            )  # fmt: skip
    if detail:
        header = ["P", "kind", "op", "calls", "MiB counted (rank 0)", "bus MiB", "latency us", "bus GB/s"]
        out += [
            f"Collectives in this projection ({f.label}):",
            "",
            *_table([*header, "s", "calls and bytes from", "bandwidth from"], detail),
            "",
        ]
    return out, rows_data


def model_section(points: list[Point], out: str | Path, options: dict) -> list[str]:
    """The report's "Cost model and projection" section; writes ``projection.png`` when it projects.

    Args:
        points: every measured point.
        out: the report directory.
        options: ``fit_ranks`` (P the fit uses, default [1, 2]), ``project_ranks`` (default
            [1, 2, 4, 8]), ``targets`` ({model: [lengths]}; default: each configuration at its largest
            length), ``benches`` (:class:`scaling_model.CommBench` list), ``ops`` ({kind: op}),
            ``references`` (byte-reference points, :func:`scaling_model.load_references`).
    """
    fits, notes = fits_of(points, options)
    lines = ["## Cost model and projection", ""]
    if not fits:
        return [
            *lines,
            "No cost model: no configuration has profiled points at two of the fit ranks.",
            *notes,
            "",
        ]
    ranks = options.get("project_ranks") or [1, 2, 4, 8]
    lines += [
        "Everything in this section except the fit points and the `measured` columns is a projection, "
        "labelled with the P it was fitted on. Model (dist_reattn/report/scaling_model.py): each compute "
        "phase t = a * w(N) / P + b * w(N), a, b >= 0 (a divides over the ranks, b is repeated on every "
        "rank), w = the q.k pairs scored for `scoring` (quadratic) and the prompt tokens N for every other "
        "phase; `unprofiled` = wall time minus the profiled phases. Each collective kind: calls * latency "
        "+ bus bytes / bus bandwidth, from the calls and bytes per prompt token counted in the records "
        "(at a P not measured for the configuration: its largest measured P scaled by a reference run of "
        "the same model and scope at both P, e.g. gloo runs at small N) and the benchmark below.",
        "",
        "### Communication benchmark",
        "",
        *_bench_lines(options.get("benches")),
        *_reference_lines(options.get("references") or []),
        "### Fit",
        "",
    ]
    for f in fits:
        lines += _fit_lines(f)
    lines += ["### Projection", ""]
    plotted = []
    for f, n in _targets(fits, options):
        more, rows = _projection_lines(points, f, n, ranks)
        lines += more
        plotted.append((f, n, rows))
    if not plotted:
        lines += ["No configuration matches `--project`.", ""]
    elif scaling_plots.plot_projection(plotted, Path(out) / "projection.png"):
        lines += ["![projection (cost model) against measured points](projection.png)", ""]
    lines += [f"* {n}" for n in notes]
    return [*lines, ""]
