"""Scaling-efficiency reports from NIAH run records: strong and weak series, phases, bytes, memory, GPU.

Input: the ``results.jsonl`` files that ``launch/niah.py`` writes, one record per trial. Records are
grouped into *points*, one per (configuration, P, requested length, decode path, tensor parallelism);
a configuration is what changes the work besides P and the length (mode, model, dtype, device type,
scope, haystack), so runs that differ there are never put in one series. Trials of one point (several
depths, trials, or several run directories) are averaged.

Definitions used throughout (T_P = mean over the point's trials of ``prefill_seconds``, the wall
time of the whole prefill on rank 0, which ends only when every rank has finished; the baseline b is
the series' smallest P, normally 1):

* throughput = mean prompt tokens / T_P (prefill tokens per second);
* strong scaling (one length, P varies): speedup = T_b / T_P, efficiency = P_b * T_b / (P * T_P);
* weak scaling (length grows with P): efficiency normalised by work,
  ``(W(N_P) / W(N_b)) * P_b * T_b / (P * T_P)``, with W the quadratic-plus-linear work model of
  :func:`work_model` (scoring ~ the q.k pairs scored, everything else ~ N). The scoring is quadratic
  in N, so a series at constant work per rank grows N as sqrt(P) (``launch/scaling.py
  --weak-len-per-rank X`` runs N(P) = X * sqrt(P)); there W(N_P) = P * W(N_b) and the efficiency is
  the plain T_b / T_P. A series at length proportional to P (older runs) quadruples the scoring per
  rank from P = 1 to 2; the normalisation keeps that from reading as a loss of efficiency.

Every number in a report names the ``file:line`` of the records it comes from.
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .niah_plots import length_label

REQUIRED = ("mode", "len", "target_len", "world", "prefill_seconds")
# What makes two records measure the same work, besides P and the length. Tensor parallelism and the
# decode path are kept per point instead: the engine turns tensor parallelism off by itself where P
# exceeds the KV heads, and neither changes which tokens the prefill reads.
VARIANT_FIELDS = (
    "mode",
    "model",
    "dtype",
    "device",
    "sink",
    "local",
    "topk",
    "span",
    "recall_clip",
    "chunk",
    "haystack",
)
# Profile phases grouped into bar segments; each ``comm:<kind>`` phase is a segment of its own.
PHASE_GROUPS = {
    "scoring": ("scoring",),
    "selection": ("selection",),
    "attention": ("attention", "kv_fetch", "append"),
    "model": ("model",),
}
# How N grows with P in a weak series: "sqrt" holds the quadratic scoring work per rank constant,
# "linear" (N proportional to P) the tokens per rank.
WEAK_GROWTH = ("sqrt", "linear")
WEAK_MULTIPLE = 512  # sqrt-grown lengths are rounded to this many tokens (a chunk, two pages)
PHASE_RANK_RULE = (
    "rank 0's phases, mean over trials (ranks meet at every collective, so their totals agree; how "
    "the time splits differs: a rank that finishes its share early waits inside the next collective, "
    "which for AutoTP's all-reduces is inside `model`; the per-rank table shows every rank)"
)


class ScalingError(ValueError):
    """Bad input for a scaling report: one line for the user."""


@dataclass(frozen=True)
class Source:
    """Where a record came from: a results file and its 1-based line number."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Point:
    """The trials of one configuration at one (P, requested length)."""

    variant: tuple
    world: int
    length: int
    decode: str | None  # None at P = 1, where there is one decode path
    tensor_parallel: bool | None
    layout: str | None = None  # "sequence" / "tensor" where the records say (None at P = 1)
    records: list[dict] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)
    id: str = ""

    @property
    def label(self) -> str:
        return f"P={self.world} {length_label(self.length)}"

    @property
    def trials(self) -> int:
        return len(self.records)

    @property
    def tokens(self) -> float:
        return _mean([r["len"] for r in self.records])

    @property
    def prefill_s(self) -> float:
        return _mean([r["prefill_seconds"] for r in self.records])

    @property
    def throughput(self) -> float:
        return self.tokens / self.prefill_s

    @property
    def decode_ms(self) -> float | None:
        return _mean([r["decode_ms_per_token"] for r in self.records if "decode_ms_per_token" in r])

    @property
    def correct(self) -> str:
        return f"{sum(bool(r.get('correct')) for r in self.records)}/{self.trials}"

    def source_text(self) -> str:
        return compress_sources(self.sources)


@dataclass
class Series:
    """Points of one configuration forming a strong (fixed length) or weak (length grows with P) series."""

    kind: str  # "strong" | "weak"
    points: list[Point]  # ascending P
    tag: str = ""  # the configuration, where a report holds several
    growth: str | None = None  # weak: "sqrt" | "linear" | "other" (see WEAK_GROWTH)

    @property
    def base(self) -> Point:
        return self.points[0]

    @property
    def title(self) -> str:
        b = self.base
        tag = f" ({self.tag})" if self.tag else ""
        if self.kind == "strong":
            return f"strong scaling at {length_label(b.length)}{tag}"
        if self.growth == "sqrt":
            x = length_label(round(b.length / b.world**0.5))
            return f"weak scaling at constant work per rank, N = {x} x sqrt(P){tag}"
        if self.growth == "linear":
            return f"weak scaling at {length_label(b.length // b.world)} per rank, N proportional to P{tag}"
        return f"weak scaling from {length_label(b.length)} at P={b.world}{tag}"

    def work(self):
        """The series' :func:`work_model` (built on its baseline point)."""
        return work_model(self.base)

    def rows(self) -> list[dict]:
        """Per point: P, tokens, T_P, throughput, speedup (strong) or throughput ratio (weak), efficiency.

        Weak rows also carry ``work`` = W(N_P) / W(N_b), ``work_per_rank`` = work * P_b / P and
        ``raw`` = T_b / T_P (the efficiency before normalising by work).
        """
        b = self.base
        rows = []
        w = self.work() if self.kind == "weak" else None
        for p in self.points:
            row = {"point": p, "speedup": None, "ratio": None}
            if self.kind == "strong":
                row["speedup"] = b.prefill_s / p.prefill_s
                row["efficiency"] = b.world * b.prefill_s / (p.world * p.prefill_s)
            else:
                work = w(p.tokens) / w(b.tokens)
                row["ratio"] = p.throughput / b.throughput
                row["raw"] = b.prefill_s / p.prefill_s
                row["work"] = work
                row["work_per_rank"] = work * b.world / p.world
                row["efficiency"] = work * b.world * b.prefill_s / (p.world * p.prefill_s)
            rows.append(row)
        return rows


def scoring_pairs(n: float, sink: int, local: int, chunk: int) -> float:
    """Query-key pairs the retrieval scores over a prefill of ``n`` tokens, per query head and layer.

    Chunk i (ending at token e_i) scores each of its queries against the middle ``[sink, e_i - local)``:
    the sum over chunks of ``c_i * max(e_i - sink - local, 0)``, about ``(n - sink - local)^2 / 2``.
    """
    n = int(round(n))
    total, end = 0, 0
    while end < n:
        c = min(chunk, n - end)
        end += c
        total += c * max(end - sink - local, 0)
    return float(total)


def scope_of(point: Point) -> tuple[int, int, int]:
    """(sink, local, chunk) of the point's records (paper defaults where a record lacks them)."""
    r = point.records[0]
    return int(r.get("sink", 32)), int(r.get("local", 4096)), int(r.get("chunk", 512))


def scoring_share(point: Point) -> float | None:
    """Rank 0's scoring seconds over its profiled prefill total (mean over trials); None without a profile."""
    ph = phases(point)
    if not ph or sum(ph.values()) <= 0:
        return None
    return ph.get("scoring", 0.0) / sum(ph.values())


def work_model(base: Point):
    """W(n): the prefill work at ``n`` prompt tokens, in seconds of the baseline point's own run.

    ``W(n) = T_s * Q(n) / Q(N_b) + (T_b - T_s) * n / N_b``: the baseline's scoring time T_s scaled by
    the scored pairs Q (:func:`scoring_pairs`, quadratic), the rest of its time by the tokens. Without
    a profile the whole time is taken as scoring (the quadratic bound). So W(N_b) = T_b, and
    W(n) / W(N_b) is how much more work a run at n tokens does than the baseline.
    """
    sink, local, chunk = scope_of(base)
    nb, tb = base.tokens, base.prefill_s
    share = scoring_share(base)
    q_b = scoring_pairs(nb, sink, local, chunk)
    share = 1.0 if share is None else share
    if q_b <= 0:
        share = 0.0

    def w(n: float) -> float:
        quad = share * tb * scoring_pairs(n, sink, local, chunk) / q_b if share else 0.0
        return quad + (1.0 - share) * tb * n / nb

    w.share = share
    return w


def sqrt_length(per_rank: int, world: int, multiple: int = WEAK_MULTIPLE) -> int:
    """N(P) = per_rank * sqrt(P), rounded to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, round(per_rank * world**0.5 / multiple) * multiple)


def weak_growth(points: list[Point], multiple: int = WEAK_MULTIPLE) -> str | None:
    """``sqrt`` / ``linear`` when the points' lengths follow N = X * sqrt(P) / N = X * P, else None."""
    b = min(points, key=lambda p: p.world)
    if b.length % b.world == 0 and all(p.length * b.world == b.length * p.world for p in points):
        return "linear"
    x = round(b.length / b.world**0.5 / multiple) * multiple
    if x > 0 and all(p.length == sqrt_length(x, p.world, multiple) for p in points):
        return "sqrt"
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compress_sources(sources: list[Source]) -> str:
    """``a.jsonl:1-3,5; b.jsonl:2``: the lines of each file, consecutive runs as ranges."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for s in sources:
        by_file[s.path].append(s.line)
    parts = []
    for path, lines in by_file.items():
        lines = sorted(set(lines))
        runs, start, prev = [], lines[0], lines[0]
        for cur in [*lines[1:], None]:
            if cur is None or cur != prev + 1:
                runs.append(str(start) if start == prev else f"{start}-{prev}")
                start = cur
            prev = cur
        parts.append(f"{path}:{','.join(runs)}")
    return "; ".join(parts)


def results_file(path: str | os.PathLike) -> Path:
    """A run directory's ``results.jsonl`` (or the file itself when given one)."""
    p = Path(path)
    f = p if p.is_file() else p / "results.jsonl"
    if not f.is_file():
        raise ScalingError(f"{path}: no results.jsonl there (give run directories written by launch/niah.py)")
    return f


def _display(path: Path) -> str:
    """The path relative to the working directory when it is below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def read_numbered(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) for every line of a JSONL file that parses as an object."""
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f.read().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a torn line from a killed writer: results.read_records skips it too
                continue
            if isinstance(record, dict):
                out.append((i, record))
    return out


def layout_of(record: dict) -> str | None:
    """The rank layout (``sequence`` / ``tensor``) a record of P > 1 names, top level or under ``parallel``."""
    if int(record.get("world", 1)) <= 1:
        return None
    parallel = record.get("parallel")
    return record.get("layout") or (parallel.get("layout") if isinstance(parallel, dict) else None)


def variant_of(record: dict) -> tuple:
    """The record's configuration; the device only by type (``cuda:1`` and ``cuda:0`` are one)."""
    values = []
    for f in VARIANT_FIELDS:
        v = record.get(f)
        if f == "device" and isinstance(v, str):
            v = v.split(":")[0]
        values.append(v)
    return tuple(values)


def load_points(
    dirs: list[str | os.PathLike], mode: str | None = "reattention"
) -> tuple[list[Point], list[str]]:
    """Reads run directories into points.

    Args:
        dirs: run directories (or results.jsonl files).
        mode: keep only records of this mode (None: every mode).

    Returns:
        (points sorted by configuration, length and P, with ids; notes on skipped records).

    Raises:
        ScalingError: a directory without results, or no usable record at all.
    """
    points: dict[tuple, Point] = {}
    skipped: dict[str, int] = defaultdict(int)
    for d in dirs:
        f = results_file(d)
        shown = _display(f)
        for line, r in read_numbered(f):
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                skipped[f"{shown}: no {', '.join(missing)}"] += 1
                continue
            if mode is not None and r["mode"] != mode:
                skipped[f"{shown}: mode {r['mode']}"] += 1
                continue
            for k in ("len", "target_len", "world"):
                v = r[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ScalingError(
                        f"{shown}:{line}: {k} is {json.dumps(v)}, not a positive integer: fix or delete "
                        "that line (launch/niah.py writes whole records)"
                    )
            if not isinstance(r["prefill_seconds"], (int, float)) or r["prefill_seconds"] <= 0:
                skipped[f"{shown}: prefill_seconds {r['prefill_seconds']}"] += 1
                continue
            world = int(r["world"])
            decode = r.get("decode") if world > 1 else None
            key = (variant_of(r), world, int(r["target_len"]), decode, r.get("tensor_parallel"), layout_of(r))
            p = points.setdefault(key, Point(*key))
            p.records.append(r)
            p.sources.append(Source(shown, line))
            p.dirs.add(str(d))
    if not points:
        why = "; ".join(f"{k} ({n})" for k, n in skipped.items()) or "the files are empty"
        raise ScalingError(f"no usable {mode} records in {' '.join(map(str, dirs))}: {why}")
    variants = sorted({p.variant for p in points.values()}, key=lambda v: tuple(map(str, v)))
    out = sorted(
        points.values(),
        key=lambda p: (
            variants.index(p.variant),
            p.length,
            p.world,
            str(p.decode),
            str(p.tensor_parallel),
            str(p.layout),
        ),  # fmt: skip
    )
    _name(out, len(variants) > 1 and variants)
    notes = [f"skipped {n} record(s): {k}" for k, n in skipped.items()]
    return out, notes


def _name(points: list[Point], variants: list | bool) -> None:
    """Ids ``p<P>-<length>``, with the decode path and tensor parallelism where those alone tell two
    points apart, and ``-c<n>`` for the n-th configuration when there are several."""
    clash: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        clash[(p.variant, p.world, p.length)].append(p)
    for p in points:
        p.id = f"p{p.world}-{length_label(p.length)}"
        others = clash[(p.variant, p.world, p.length)]
        if len({q.decode for q in others}) > 1:
            p.id += f"-{p.decode}"
        if len({q.tensor_parallel for q in others}) > 1:
            p.id += "-tp" if p.tensor_parallel else "-notp"
        if len({q.layout for q in others}) > 1:
            p.id += f"-{p.layout}"
        if variants:
            p.id += f"-c{variants.index(p.variant) + 1}"


def auto_series(points: list[Point], multiple: int = WEAK_MULTIPLE) -> tuple[list[Series], list[str]]:
    """Strong series: one configuration and length at several P; weak: length ~ sqrt(P) or ~ P.

    A point may belong to several (P=2 at 16K is in the 16K strong series and the 8K-per-rank weak
    one). Where runs at P > 1 used several decode paths, the series take the one with the most points
    (the prefill, which the series measure, is the same on every path); the others stay in the points
    table. Where P > 1 runs used several rank layouts, each layout gets its own series (sharing P = 1).

    Args:
        points: from :func:`load_points`.
        multiple: the rounding of sqrt-grown lengths (:func:`sqrt_length`).

    Returns:
        (series, notes on points left out of them).
    """
    series, notes = [], []
    by_variant: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        by_variant[p.variant].append(p)
    for group in by_variant.values():
        paths = Counter(p.decode for p in group if p.world > 1)
        main = paths.most_common(1)[0][0] if paths else None
        left = [p.id for p in group if p.world > 1 and p.decode != main]
        if left:
            notes.append(
                f"{', '.join(left)}: decode path other than {main}, left out of the series (same prefill; "
                "compare decode ms/token in the points table)"
            )
        group = [p for p in group if p.world == 1 or p.decode == main]
        layouts = list(dict.fromkeys(p.layout for p in group if p.world > 1)) or [None]
        for layout in layouts:
            sub = [p for p in group if p.world == 1 or p.layout == layout]
            series += _series_of(sub, multiple, notes)
    return series, notes


def _series_of(group: list[Point], multiple: int, notes: list[str]) -> list[Series]:
    found: dict[tuple, list[Point]] = defaultdict(list)
    for p in group:
        found[("strong", None, p.length)].append(p)
        if p.length % p.world == 0:
            found[("weak", "linear", p.length // p.world)].append(p)
        x = round(p.length / p.world**0.5 / multiple) * multiple
        if p.world > 1 and x > 0 and sqrt_length(x, p.world, multiple) == p.length:
            found[("weak", "sqrt", x)].append(p)
        elif p.world == 1:
            found[("weak", "sqrt", p.length)].append(p)
    out = []
    for (kind, growth, _), members in sorted(
        found.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])
    ):
        worlds = [p.world for p in members]
        if len(set(worlds)) < len(worlds):
            notes.append(
                f"no {kind} series over {', '.join(p.id for p in members)}: two points at one P "
                "(tensor parallelism on and off); name the series with --strong/--weak"
            )
        elif len(members) >= 2 and not (kind == "weak" and len({p.length for p in members}) == 1):
            out.append(Series(kind, sorted(members, key=lambda p: p.world), growth=growth))
    # strong first, then weak at constant work (sqrt), then length ~ P: each by length
    order = {("strong", None): 0, ("weak", "sqrt"): 1, ("weak", "linear"): 2}
    return sorted(out, key=lambda s: (order[(s.kind, s.growth)], s.base.length))


def explicit_series(kind: str, points: list[Point], dirs: list[str]) -> Series:
    """The points read from ``dirs`` as one series of ``kind``, checked: one configuration, distinct P,
    and one length (strong) or one length per rank (weak)."""
    members = sorted((p for p in points if p.dirs & set(map(str, dirs))), key=lambda p: p.world)
    where = " ".join(map(str, dirs))
    if len(members) < 2:
        raise ScalingError(f"--{kind} {where}: needs records at two or more P, found {len(members)} point(s)")
    if len({p.variant for p in members}) > 1:
        differ = [
            f
            for f, *vals in zip(VARIANT_FIELDS, *(p.variant for p in members), strict=True)
            if len(set(vals)) > 1
        ]
        raise ScalingError(f"--{kind} {where}: the runs differ in {', '.join(differ)}")
    worlds = [p.world for p in members]
    if len(set(worlds)) < len(worlds):
        raise ScalingError(f"--{kind} {where}: several points at one P ({', '.join(p.id for p in members)})")
    if kind == "strong":
        if len({p.length for p in members}) > 1:
            raise ScalingError(f"--{kind} {where}: not one length ({', '.join(p.id for p in members)})")
        return Series(kind, members)
    growth = weak_growth(members)
    if growth is None:
        raise ScalingError(
            f"--{kind} {where}: not one length per rank, N neither proportional to sqrt(P) nor to P "
            f"({', '.join(p.id for p in members)})"
        )
    return Series(kind, members, growth=growth)


# ---- per-point measures -------------------------------------------------------------------------


def phase_group(phase: str) -> str:
    """The bar segment a profile phase belongs to."""
    for group, names in PHASE_GROUPS.items():
        if phase in names:
            return group
    return phase  # comm:<kind> and any phase added later keep their own name


def _rank_profile(record: dict, rank: int, stage: str) -> dict | None:
    for rr in record.get("ranks") or []:
        if rr.get("rank") == rank:
            return (rr.get("profile") or {}).get(stage)
    return (record.get("profile") or {}).get(stage) if rank == 0 else None


def phases(point: Point, stage: str = "prefill", rank: int = 0) -> dict[str, float] | None:
    """Mean over trials of one rank's seconds per phase group (see PHASE_RANK_RULE).

    Returns:
        ``{group: seconds}``, compute groups first, then ``comm:<kind>`` ones; None if no record
        has that rank's profile.
    """
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for r in point.records:
        prof = _rank_profile(r, rank, stage)
        if not prof:
            continue
        n += 1
        for phase, s in prof["seconds"].items():
            sums[phase_group(phase)] += s
    if not n:
        return None
    order = [*PHASE_GROUPS, *sorted(k for k in sums if k not in PHASE_GROUPS)]
    return {k: sums[k] / n for k in order if k in sums}


def rank_phases(point: Point, stage: str = "prefill") -> dict[int, dict[str, float]]:
    """:func:`phases` of every rank that recorded a profile, by rank."""
    ranks = sorted({rr["rank"] for r in point.records for rr in r.get("ranks") or []}) or [0]
    out = {k: phases(point, stage, k) for k in ranks}
    return {k: v for k, v in out.items() if v}


def collectives(point: Point) -> dict[str, dict] | None:
    """Per collective kind, means over trials: rank 0's calls, bytes and seconds, bytes over all ranks.

    Bytes are what each rank contributes (its input tensor), counted over the whole trial (prefill and
    decode). Returns None if no record has collective counts.
    """
    out: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    n = 0
    for r in point.records:
        if "collectives" not in r:
            continue
        n += 1
        for kind, c in r["collectives"].items():
            o = out[kind]
            o["calls"] += c["calls"]
            o["bytes_rank0"] += c["bytes"]
            o["seconds_rank0"] += c["seconds"]
        ranks = r.get("ranks") or [{"collectives": r["collectives"]}]
        for rr in ranks:
            for kind, c in (rr.get("collectives") or {}).items():
                out[kind]["bytes_all"] += c["bytes"]
    if not n:
        return None
    return {
        kind: {
            **{k: v / n for k, v in o.items()},
            "per_call": o["bytes_all"] / o["calls"] if o["calls"] else 0.0,
        }
        for kind, o in sorted(out.items())
    }


def memory(point: Point) -> list[dict] | None:
    """Per rank: KV bytes, peak bytes (max over trials) and the planned total; None if not recorded."""
    per: dict[int, dict] = {}
    for r in point.records:
        plan = r.get("memory_plan") or {}
        planned = sum(plan.get(k, 0) for k in ("kv_bytes", "weight_bytes", "activation_bytes")) or None
        ranks = r.get("ranks") or (
            [{"rank": 0, "kv_bytes": r["kv_bytes_per_rank"], "peak_memory_bytes": r.get("peak_memory_bytes")}]
            if "kv_bytes_per_rank" in r
            else []
        )
        for rr in ranks:
            m = per.setdefault(
                rr["rank"], {"rank": rr["rank"], "kv_bytes": 0, "peak_bytes": 0, "planned_bytes": None}
            )
            m["kv_bytes"] = max(m["kv_bytes"], rr.get("kv_bytes") or 0)
            m["peak_bytes"] = max(m["peak_bytes"], rr.get("peak_memory_bytes") or 0)
            if planned:
                m["planned_bytes"] = max(m["planned_bytes"] or 0, planned)
                m["plan_device"] = plan.get("device")
    return [per[k] for k in sorted(per)] if per else None


def telemetry(point: Point) -> dict:
    """GPU telemetry per rank (means over trials), or ``{"gpu": None, "note": ...}``.

    Returns:
        ``{"gpu": None, "note": why}`` when no record of the point has a GPU sample; else
        ``{"gpu": name, "ranks": [{rank, power_w_mean, power_w_max, util_mean_pct, memory_used_max_bytes}]}``.
    """
    per: dict[int, list[dict]] = defaultdict(list)
    notes = set()
    for r in point.records:
        ranks = r.get("ranks") or [{"rank": 0, "telemetry": r.get("telemetry")}]
        for rr in ranks:
            t = rr.get("telemetry")
            if not t:
                notes.add("telemetry not recorded")
            elif t.get("gpu") is None:
                notes.add(t.get("note") or "no GPU telemetry")
            else:
                per[rr["rank"]].append(t)
    if not per:
        return {"gpu": None, "note": "; ".join(sorted(notes)) or "no GPU telemetry"}

    def avg(ts, k):
        vals = [t[k] for t in ts if t.get(k) is not None]
        return _mean(vals)

    ranks = [
        {
            "rank": k,
            "gpu": ts[0]["gpu"],
            "power_w_mean": avg(ts, "power_w_mean"),
            "power_w_max": max(
                (t["power_w_max"] for t in ts if t.get("power_w_max") is not None), default=None
            ),
            "util_mean_pct": avg(ts, "util_mean_pct"),
            "memory_used_max_bytes": max(t.get("memory_used_max_bytes") or 0 for t in ts),
        }
        for k, ts in sorted(per.items())
    ]
    return {"gpu": ranks[0]["gpu"], "ranks": ranks}


# ---- commands -----------------------------------------------------------------------------------

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def reconstruct_command(records: list[dict], out: str) -> str:
    """A ``launch/niah.py`` command that re-runs these records (one run directory) from their fields.

    Fields a record does not keep (``--max-new-tokens``, ``--cache.page``) are left at their defaults.
    """
    r0 = records[0]
    world = int(r0["world"])
    lens = sorted({int(r["target_len"]) for r in records})
    depths = sorted({float(r["depth"]) for r in records if "depth" in r})
    modes = list(dict.fromkeys(r["mode"] for r in records))
    cmd = ["python"] if world == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(world)]
    cmd += ["launch/niah.py", "--model", str(r0.get("model", "smollm2-135m"))]
    cmd += ["--len", ",".join(length_label(n) for n in lens), "--mode", ",".join(modes)]
    if depths:
        cmd += ["--depths", ",".join(f"{d:g}" for d in depths)]
    cmd += [
        "--trials",
        str(max(int(r.get("trial", 0)) for r in records) + 1),
        "--seed",
        str(r0.get("seed", 0)),
    ]
    if "haystack" in r0:
        cmd += ["--haystack", r0["haystack"]]
    for f in ("sink", "local", "topk", "span", "recall_clip", "chunk"):
        if f in r0:
            cmd.append(f"--scope.{f}={r0[f]}")
    if r0.get("dtype") in _DTYPES:
        cmd.append(f"--model.dtype={_DTYPES[r0['dtype']]}")
    if "tensor_parallel" in r0 and world > 1:
        cmd.append(f"--parallel.tensor_parallel={str(r0['tensor_parallel']).lower()}")
    if "decode" in r0 and world > 1:
        cmd.append(f"--parallel.decode={r0['decode']}")
    return shlex.join([*cmd, "--out", out])


def run_commands(dirs: list[str]) -> list[tuple[str, str, bool]]:
    """(run dir, command, exact?) per directory: ``DIR/command.txt`` when there (written by
    launch/scaling.py), else reconstructed from the records."""
    out = []
    for d in dict.fromkeys(map(str, dirs)):
        f = results_file(d)
        saved = f.parent / "command.txt"
        if saved.is_file():
            out.append((d, saved.read_text().strip(), True))
            continue
        records = [r for _, r in read_numbered(f) if all(k in r for k in REQUIRED)]
        if records:
            out.append((d, reconstruct_command(records, _display(f.parent)), False))
    return out
