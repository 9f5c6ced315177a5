"""A per-phase cost model of the prefill, fitted on measured points, that projects other P and lengths.

Compute phases (rank 0's profile, seconds per trial) are fitted as ``t = a * w(N) / P + b * w(N)``
with a, b >= 0: ``a`` is the part that divides over the ranks, ``b`` the part every rank repeats.
``w`` is the phase's work shape: the scored q.k pairs (:func:`scaling.scoring_pairs`, quadratic in N)
for ``scoring``, the prompt tokens N for every other phase (``selection``, ``attention``,
``kv_fetch``, ``append``, ``model``, phases added later, and ``unprofiled`` = wall minus profiled).
With points at two P the fit is exact; with more it is least squares in relative error.

A collective kind ``k`` (profile phase ``comm:k``) is modelled from bandwidth, not fitted on its
measured seconds (which include waiting for the slowest rank):
``t = calls * latency + bus_bytes / bus_bandwidth``, with latency and bus bandwidth of the kind's
operation from ``launch/bench_comm.py`` (:func:`load_bench`). Calls and bytes per prompt token at a
P are those measured for the configuration at that P; at a P it was not measured at they are the
configuration's largest measured P scaled by a reference configuration that was (same model and
scope, any device: bytes do not depend on the backend, and gloo runs at small N count them at
P = 1..8): ``meas(P_c) * ref(P) / ref(P_c)``, with ``ref(P)`` and ``ref(P_c)`` counted at the same
prompt length (the first slabs attend without retrieval, so rates per token depend a little on the
length) and in the same layout. A reference may be a shallower copy of the model's shape (same heads,
head dim and scope, fewer layers: ``launch/scaling.py --bytes-reference MODEL=DIR``): every per-layer
count scales with the depth, which cancels in the ratio. Without a benchmark, the bandwidth is the
effective one the configuration achieved at its largest measured P (labelled so).

The op of a kind is the record's where it names one, else :func:`op_hint`: ``topk_candidates`` is an
all-to-all in the ``sequence`` layout (each chunk's candidates go to the rank that attends it) and an
all-gather where every rank attends every chunk. At P = 2 both move the same bus bytes; at P = 8 an
all-gather would move 7 times what the rank put in, the all-to-all once.

Nothing here is a measurement: every table and figure built from it says "projection (cost model
fitted on P=..)".
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .scaling import VARIANT_FIELDS, Point, ScalingError, collectives, load_points, scope_of, scoring_pairs

OPS = ("all_gather", "all_to_all", "all_reduce", "reduce_scatter", "broadcast")
# Which operation an engine kind is, where its record entry carries no "op" of its own. A kind not
# named here is taken as an all-gather and the report says so (--comm-op KIND=OP overrides).
OP_HINTS = {
    "qkv_slab": "all_gather",
    "qkv_heads": "all_gather",
    "topk_candidates": "all_gather",
    "scope_lists": "all_gather",
    "scope_kv": "all_to_all",
    "decode_partials": "all_gather",
    "logits": "broadcast",
    "consensus": "all_gather",
}
# Kinds whose op depends on the layout (exchange.route_candidates: an all-to-all where the steps are
# split over sequence groups, an all-gather where every rank attends every chunk).
LAYOUT_OP_HINTS = {("sequence", "topk_candidates"): "all_to_all"}
QUADRATIC = ("scoring",)
UNPROFILED = "unprofiled"
SCOPE_FIELDS = ("model", "sink", "local", "topk", "span", "recall_clip", "chunk")


def op_hint(kind: str, layout: str | None) -> str | None:
    """The op of an engine kind in a layout, where the record names none (None: not known)."""
    return LAYOUT_OP_HINTS.get((layout, kind)) or OP_HINTS.get(kind)


def bus_bytes(op: str, world: int, counted: float) -> float:
    """Bus bytes (nccl-tests' definition) of a call whose rank counted ``counted`` bytes.

    ``dist_reattn.distributed.Comm`` counts per rank: the input of an all-gather (S/P of the S-byte
    result), what an all-to-all sends to the others (S(P-1)/P), the whole input of an all-reduce and
    a reduce-scatter (S), the source's tensor of a broadcast (S).
    """
    p = world
    if op == "all_gather":
        return counted * (p - 1)
    if op in ("all_to_all", "broadcast"):
        return counted
    if op == "all_reduce":
        return counted * 2 * (p - 1) / p
    if op == "reduce_scatter":
        return counted * (p - 1) / p
    raise ValueError(f"unknown collective op {op!r} (one of {', '.join(OPS)})")


# ---- the communication benchmark ----------------------------------------------------------------


@dataclass
class CommBench:
    """One ``launch/bench_comm.py`` result: per op, latency (s) and bus bandwidth (bytes/s) at ``world``."""

    path: str
    world: int
    backend: str
    device: str
    ops: dict[str, dict]  # op -> {"latency_s", "busbw_Bps", "peak_busbw_Bps", "points": [...]}

    @property
    def label(self) -> str:
        return f"{self.backend} P={self.world} {self.device} ({self.path})"


def alpha_beta(points: list[dict]) -> tuple[float, float]:
    """(latency s, bus bandwidth bytes/s) of ``t = latency + bus_bytes / bandwidth`` over a size sweep.

    Least squares in relative error (each point weighted by 1/t), so the small sizes fix the latency
    and the large ones the bandwidth. Latency is clamped at 0.

    Args:
        points: ``[{"bus_bytes": B, "seconds": t}, ...]``, two or more sizes.
    """
    xs = [float(p["bus_bytes"]) for p in points]
    ts = [float(p["seconds"]) for p in points]
    ws = [1.0 / t**2 for t in ts]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs, strict=True))
    st = sum(w * t for w, t in zip(ws, ts, strict=True))
    sxx = sum(w * x * x for w, x in zip(ws, xs, strict=True))
    sxt = sum(w * x * t for w, x, t in zip(ws, xs, ts, strict=True))
    det = sw * sxx - sx * sx
    if len(points) < 2 or det <= 0:
        raise ValueError("alpha_beta needs two or more distinct sizes")
    beta = (sw * sxt - sx * st) / det
    alpha = (st - beta * sx) / sw
    if alpha < 0 or beta <= 0:  # refit through the origin: pure bandwidth
        alpha = 0.0
        beta = sum(w * x * t for w, x, t in zip(ws, xs, ts, strict=True)) / sxx
    return alpha, 1.0 / beta


def load_bench(paths: list[str | os.PathLike]) -> list[CommBench]:
    """Reads bench_comm JSON files (one per world size).

    Raises:
        ScalingError: a file that is missing or not a bench_comm result.
    """
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ScalingError(f"--comm-bench {path}: cannot read it ({e})") from e
        if data.get("kind") != "bench_comm" or "ops" not in data:
            raise ScalingError(f"--comm-bench {path}: not a launch/bench_comm.py result")
        out.append(
            CommBench(
                str(path),
                int(data["world"]),
                data.get("backend", "?"),
                data.get("device", "?"),
                data["ops"],
            )
        )
    return out


def pick_bench(benches: list[CommBench], world: int) -> CommBench | None:
    """The benchmark at ``world`` ranks; else the largest below it; else the smallest."""
    if not benches:
        return None
    exact = [b for b in benches if b.world == world]
    if exact:
        return exact[0]
    below = [b for b in benches if b.world < world]
    return max(below, key=lambda b: b.world) if below else min(benches, key=lambda b: b.world)


# ---- byte references ----------------------------------------------------------------------------


def load_references(items: list[str], mode: str | None = "reattention") -> tuple[list[Point], list[str]]:
    """Run directories read only for their collective counts (the cost model's byte reference).

    Args:
        items: ``DIR`` (its records count for their own model) or ``MODEL=DIR`` (they count for
            ``MODEL``: a shallower copy of its shape, same heads, head dim and scope).
        mode: keep only records of this mode.

    Returns:
        (points with ids ``ref-<id>``, their variant's model set to ``MODEL`` where given; notes).

    Raises:
        ScalingError: an item that names no directory with records.
    """
    groups: dict[str | None, list[str]] = defaultdict(list)
    for item in items:
        model, sep, d = item.partition("=")
        if sep and (not model or not d):
            raise ScalingError(f"--bytes-reference {item!r}: give DIR or MODEL=DIR")
        groups[model if sep else None].append(d if sep else item)
    out, notes = [], []
    at = VARIANT_FIELDS.index("model")
    for model, dirs in groups.items():
        points, more = load_points(dirs, mode)
        notes += more
        for p in points:
            p.id = f"ref-{p.id}"
            if model is not None:
                p.variant = (*p.variant[:at], model, *p.variant[at + 1 :])
        out += points
    return out, notes


# ---- per-point measures the model uses ----------------------------------------------------------


def raw_phases(point: Point, stage: str = "prefill") -> dict[str, float] | None:
    """Rank 0's seconds per profile phase (ungrouped), mean over trials, plus ``unprofiled`` (wall
    prefill time minus the profiled total); None when no record has a profile."""
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for r in point.records:
        prof = (r.get("profile") or {}).get(stage)
        for rr in r.get("ranks") or []:
            if rr.get("rank") == 0:
                prof = (rr.get("profile") or {}).get(stage) or prof
        if not prof:
            continue
        n += 1
        for phase, s in prof["seconds"].items():
            sums[phase] += s
        sums[UNPROFILED] += r["prefill_seconds"] - sum(prof["seconds"].values())
    if not n:
        return None
    return {k: v / n for k, v in sums.items()}


def comm_rates(point: Point) -> dict[str, dict]:
    """Per collective kind: rank 0's calls and bytes per prompt token, with the kind's op.

    Uses ``profile.prefill.collectives`` where a record has it (prefill only); else the trial's
    totals, which include the decode steps (``prefill_only`` False).
    """
    out: dict[str, dict] = {}
    pre = [((r.get("profile") or {}).get("prefill") or {}).get("collectives") for r in point.records]
    tokens = point.tokens
    if pre and all(pre):
        acc: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for c in pre:
            for kind, v in c.items():
                acc[kind]["calls"] += v["calls"] / len(pre)
                acc[kind]["bytes_rank0"] += v["bytes"] / len(pre)
                acc[kind]["op"] = v.get("op")
        src, prefill_only = acc, True
    else:
        src, prefill_only = collectives(point) or {}, False
        ops = {k: v.get("op") for r in point.records for k, v in (r.get("collectives") or {}).items()}
        for k in src:
            src[k]["op"] = ops.get(k)
    for kind, v in src.items():
        out[kind] = {
            "calls_per_token": v["calls"] / tokens,
            "bytes_per_token": v["bytes_rank0"] / tokens,
            "op": v.get("op"),
            "prefill_only": prefill_only,
        }
    return out


# ---- the fit ------------------------------------------------------------------------------------


def _work(phase: str, n: float, scope: tuple[int, int, int]) -> float:
    return scoring_pairs(n, *scope) if phase in QUADRATIC else float(n)


def nnls2(rows: list[tuple[float, float]], ys: list[float]) -> tuple[float, float]:
    """Non-negative least squares with two unknowns, in relative error: min sum ((x.c - y) / y)^2.

    Points with y <= 0 are weighted as if y were the largest y (so a zero measurement still counts).
    """
    big = max([abs(y) for y in ys] + [1e-12])
    ws = [1.0 / (y if y > 0 else big) ** 2 for y in ys]

    def solve(cols: tuple[int, ...]) -> tuple[float, float] | None:
        c = [0.0, 0.0]
        if len(cols) == 1:
            i = cols[0]
            den = sum(w * r[i] ** 2 for w, r in zip(ws, rows, strict=True))
            if den <= 0:
                return None
            c[i] = sum(w * r[i] * y for w, r, y in zip(ws, rows, ys, strict=True)) / den
        else:
            a = sum(w * r[0] ** 2 for w, r in zip(ws, rows, strict=True))
            b = sum(w * r[0] * r[1] for w, r in zip(ws, rows, strict=True))
            d = sum(w * r[1] ** 2 for w, r in zip(ws, rows, strict=True))
            e = sum(w * r[0] * y for w, r, y in zip(ws, rows, ys, strict=True))
            f = sum(w * r[1] * y for w, r, y in zip(ws, rows, ys, strict=True))
            det = a * d - b * b
            if abs(det) <= 1e-12 * max(a * d, 1e-300):
                return None
            c = [(e * d - b * f) / det, (a * f - b * e) / det]
        return (c[0], c[1]) if min(c) >= 0 else None

    def err(c):
        return sum(w * (r[0] * c[0] + r[1] * c[1] - y) ** 2 for w, r, y in zip(ws, rows, ys, strict=True))

    cands = [c for c in (solve((0, 1)), solve((0,)), solve((1,))) if c is not None] + [(0.0, 0.0)]
    return min(cands, key=err)


@dataclass
class PhaseFit:
    """``t(N, P) = divides * w(N) / P + repeats * w(N)`` for one compute phase."""

    phase: str
    shape: str  # "N^2 (scored pairs)" | "N"
    divides: float
    repeats: float
    residual: float  # max |relative error| over the fit points

    def predict(self, n: float, world: int, scope: tuple[int, int, int]) -> float:
        w = _work(self.phase, n, scope)
        return self.divides * w / world + self.repeats * w

    def divided_share(self, n: float, scope) -> float:
        """Share of the phase's one-rank time that divides over P (1: all of it)."""
        total = self.predict(n, 1, scope)
        return self.divides * _work(self.phase, n, scope) / total if total > 0 else 1.0


@dataclass
class CommModel:
    """Per collective kind: calls and bytes per token at the measured P, and the op."""

    kinds: dict[str, dict[int, dict]]  # kind -> P -> comm_rates entry (+ measured prefill seconds)
    ops: dict[str, str]
    op_notes: list[str] = field(default_factory=list)


@dataclass
class Fit:
    """The cost model of one configuration."""

    variant: tuple
    tag: str
    points: list[Point]  # the fit points
    scope: tuple[int, int, int]
    phases: list[PhaseFit]
    comm: CommModel
    references: list[Point]  # same model and scope, other configurations: bytes per P
    own: list[Point]  # this configuration's points outside the fit: bytes counted at their P
    benches: list[CommBench]

    @property
    def fit_ranks(self) -> list[int]:
        return sorted({p.world for p in self.points})

    @property
    def label(self) -> str:
        return f"projection (cost model fitted on P={','.join(map(str, self.fit_ranks))})"

    @property
    def model_name(self) -> str:
        return str(self.variant[VARIANT_FIELDS.index("model")])


def _scope_key(variant: tuple) -> tuple:
    return tuple(variant[VARIANT_FIELDS.index(f)] for f in SCOPE_FIELDS)


def fit(
    points: list[Point],
    all_points: list[Point],
    benches: list[CommBench] = (),
    op_overrides: dict[str, str] | None = None,
    tag: str = "",
) -> Fit:
    """Fits the cost model of one configuration on its measured points.

    Args:
        points: the fit points, one configuration, at two or more P, with profiles.
        all_points: every point read (reference bytes per P come from the others of the same scope).
        benches: bench_comm results.
        op_overrides: kind -> op, over the record's own and OP_HINTS.
        tag: the configuration's short label.

    Raises:
        ScalingError: fewer than two P among points with profiles.
    """
    prof = [(p, raw_phases(p)) for p in points]
    prof = [(p, ph) for p, ph in prof if ph]
    if len({p.world for p, _ in prof}) < 2:
        raise ScalingError(f"cost model{f' ({tag})' if tag else ''}: needs profiled points at two or more P")
    scope = scope_of(prof[0][0])
    names = list(dict.fromkeys(k for _, ph in prof for k in ph if not k.startswith("comm:")))
    fits = []
    for name in names:
        rows = [(_work(name, p.tokens, scope) / p.world, _work(name, p.tokens, scope)) for p, _ in prof]
        ys = [ph.get(name, 0.0) for _, ph in prof]
        a, b = nnls2(rows, ys)
        pred = [r[0] * a + r[1] * b for r in rows]
        res = max((abs(q - y) / y for q, y in zip(pred, ys, strict=True) if y > 0), default=0.0)
        shape = "N^2 (scored pairs)" if name in QUADRATIC else "N"
        fits.append(PhaseFit(name, shape, a, b, res))
    # Collectives: rates per measured P; the op of each kind.
    kinds: dict[str, dict[int, dict]] = defaultdict(dict)
    ops: dict[str, str] = {}
    notes = []
    for p, ph in sorted(prof, key=lambda x: x[0].tokens):  # the largest N at a P wins
        for kind, rate in comm_rates(p).items():
            if f"comm:{kind}" not in ph:
                continue  # a decode-only kind
            kinds[kind][p.world] = {**rate, "seconds": ph[f"comm:{kind}"], "tokens": p.tokens}
            if rate.get("op"):
                ops[kind] = rate["op"]
    layout = next((p.layout for p, _ in sorted(prof, key=lambda x: -x[0].world) if p.layout), None)
    for kind in kinds:
        if op_overrides and kind in op_overrides:
            ops[kind] = op_overrides[kind]
        elif kind not in ops:
            hint = op_hint(kind, layout)
            ops[kind] = hint or "all_gather"
            if hint is None:
                notes.append(f"`{kind}`: the records do not say which op; taken as all_gather (--comm-op)")
    key = _scope_key(prof[0][0].variant)
    refs = [
        q
        for q in all_points
        if _scope_key(q.variant) == key
        and q.variant != prof[0][0].variant
        and (q.world == 1 or layout is None or q.layout == layout)
    ]
    fitted = [p for p, _ in prof]
    own = [q for q in all_points if q.variant == prof[0][0].variant and q not in fitted]
    return Fit(
        prof[0][0].variant, tag, fitted, scope, fits, CommModel(kinds, ops, notes), refs, own, list(benches),
    )  # fmt: skip


# ---- projection ---------------------------------------------------------------------------------


def _ref_rates(refs: list[Point], world: int, length: int | None = None) -> dict[str, dict] | None:
    """comm_rates of the reference point at ``world`` (at ``length`` requested tokens if given, else
    the longest), with the point under ``_point``; None if there is none."""
    at = [q for q in refs if q.world == world and q.records[0].get("collectives")]
    at = [q for q in at if length is None or q.length == length]
    if not at:
        return None
    best = max(at, key=lambda q: q.tokens)
    return comm_rates(best) | {"_point": best}


def _ref_pair(refs: list[Point], world: int, base: int) -> tuple[dict, dict] | tuple[None, None]:
    """Reference rates at ``world`` and at ``base`` ranks counted at one length (the longest that both
    have): a ratio of rates at two lengths would mix in how the rates vary with the length."""
    lengths = {q.length for q in refs if q.world == world} & {q.length for q in refs if q.world == base}
    for n in sorted(lengths, reverse=True):
        ref, ref_c = _ref_rates(refs, world, n), _ref_rates(refs, base, n)
        if ref and ref_c:
            return ref, ref_c
    return None, None


def comm_projection(f: Fit, n: float, world: int, achieved: bool = False) -> dict[str, dict]:
    """Per collective kind at (n, world): calls, bytes, bus bytes, seconds, and where each came from.

    Args:
        achieved: time the bytes at the bus bandwidth the configuration achieved at its largest
            measured P (waiting and overheads included: the pessimistic bound) instead of the benchmark's.
    """
    if world == 1:
        return {}
    out = {}
    measured = sorted({w for rates in f.comm.kinds.values() for w in rates})
    for kind, rates in f.comm.kinds.items():
        op = f.comm.ops[kind]
        own = _ref_rates(f.own, world)
        if world in rates:
            r, how = rates[world], f"measured at P={world}"
        elif own is not None:
            # counted by a point of this configuration outside the fit: counts do not depend on timing
            if kind not in own:
                continue  # the kind is not used at this P (tensor parallelism off, say)
            r, how = own[kind], f"counted at P={world} ({own['_point'].id}, not in the fit)"
        else:
            pc = max(rates)
            r = dict(rates[pc])
            ref, ref_c = _ref_pair(f.references, world, pc)
            if ref and ref_c and kind in ref_c and ref_c[kind]["bytes_per_token"] > 0:
                if kind not in ref:
                    continue  # the reference does not use the kind at this P
                for k in ("calls_per_token", "bytes_per_token"):
                    if ref_c[kind][k] > 0:
                        r[k] = rates[pc][k] * ref[kind][k] / ref_c[kind][k]
                how = f"P={pc} measured x reference {ref['_point'].id} / {ref_c['_point'].id}"
            elif ref and ref_c and kind in ref_c:
                how = f"held at P={pc} per token (the reference counts no bytes of it on rank 0)"
            else:
                how = f"held at P={pc} per token (no reference at P={world})"
        calls = r["calls_per_token"] * n
        counted = r["bytes_per_token"] * n
        bus = bus_bytes(op, world, counted)
        bench = None if achieved else pick_bench(f.benches, world)
        if bench and op in bench.ops:
            lat, bw = bench.ops[op]["latency_s"], bench.ops[op]["busbw_Bps"]
            bw_how = f"bench {bench.backend} P={bench.world}"
        elif bench and "all_gather" in bench.ops:
            lat, bw = bench.ops["all_gather"]["latency_s"], bench.ops["all_gather"]["busbw_Bps"]
            bw_how = f"bench {bench.backend} P={bench.world} (all_gather for {op})"
        else:
            pm = max(w for w in measured if w in rates)
            m = rates[pm]
            m_bus = bus_bytes(op, pm, m["bytes_per_token"] * m["tokens"])
            lat, bw = 0.0, (m_bus / m["seconds"] if m["seconds"] > 0 else math.inf)
            bw_how = f"achieved at P={pm}" + ("" if achieved else " (no --comm-bench)")
        secs = calls * lat + (bus / bw if bw > 0 else 0.0)
        out[kind] = {
            "op": op, "calls": calls, "bytes": counted, "bus_bytes": bus, "latency_s": lat,
            "busbw_Bps": bw, "seconds": secs, "rates": how, "bandwidth": bw_how,
        }  # fmt: skip
    return out


def project(f: Fit, n: float, world: int, achieved: bool = False) -> dict:
    """The model's prefill at n prompt tokens on ``world`` ranks (``achieved``: see :func:`comm_projection`).

    Returns:
        ``{"phases": {phase: s}, "comm": {kind: {...}}, "total": s}``; compute phases first, then
        ``comm:<kind>``.
    """
    ph = {p.phase: p.predict(n, world, f.scope) for p in f.phases}
    comm = comm_projection(f, n, world, achieved)
    ph.update({f"comm:{k}": v["seconds"] for k, v in comm.items()})
    return {"phases": ph, "comm": comm, "total": sum(ph.values())}
