"""Tables of the selection probe and of the selection variants, from ``launch/ruler.py --diagnose`` records.

    python -m dist_reattn.report.selection_report runs/sel/*/results.jsonl --out runs/sel/selection.md

Every record of a reattention sample carries ``probe_ranks`` (per scoring, per layer, per query head:
the rank of the answer's best key among the middle keys at the step that answers; see
:mod:`dist_reattn.probe`) and ``scope_recall`` (per layer, the fraction of the answer in the scope of
that step). The tables:

* **variants**: per task, length and ``select``: accuracy, scope recall, the share of (layer, head)
  pairs whose top-k holds the answer under the scoring in force, and the prefill time;
* **scorings**: every scoring ranked on the same forwards (the records of ``select=paper``), by
  haystack: the share of (layer, head) pairs with rank < k, and rank quantiles;
* **layers**: rank quantiles per layer under the paper's scoring, prose against noise;
* **heads**: the (layer, head) pairs that rank the answer best across the prose samples;
* **fused**: the heads' scores fused per layer and over layers (``probe_fused``, see
  :mod:`dist_reattn.probe`): per layer, the share of samples whose fused rank is below ``recall_clip``
  (a scope of the best ``recall_clip`` fused keys would hold the answer) and the median rank;
* **FP8 audit** (records of ``ruler.py --fp8-audit``, where there are any): per model, task, length
  and margin, the fraction of audited rows whose FP8 top-k is the exact one and the scope's Jaccard
  overlap with the exact scope (mean and least), from :class:`~dist_reattn.probe.ScoringAudit`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..config import format_count
from .results import read_records

PROSE_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue")


def haystack_of(task: str) -> str:
    """``prose`` for the tasks whose haystack is the shipped prose, else ``noise`` (RULER's sentences)."""
    return "prose" if task in PROSE_TASKS else "noise"


def quantiles(values: list[float], qs=(0.1, 0.5, 0.9)) -> list[float]:
    """Nearest-rank quantiles of ``values`` (empty: NaN)."""
    if not values:
        return [math.nan] * len(qs)
    v = sorted(values)
    return [v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] for q in qs]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else math.nan


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ranks(record: dict, scoring: str) -> list[list[int]]:
    """The record's per-layer head ranks under ``scoring``, layers without a middle target dropped."""
    return [layer for layer in record.get("probe_ranks", {}).get(scoring, []) if layer is not None]


def _hit(record: dict, scoring: str) -> float | None:
    flat = [r for layer in _ranks(record, scoring) for r in layer]
    return sum(r < record["topk"] for r in flat) / len(flat) if flat else None


# The scope settings that tell two runs of one ``select`` apart in the variants table.
SETTINGS = (("span", "span"), ("recall_clip", "clip"), ("topk", "topk"), ("distinct", "distinct"))


def variant(record: dict, settings: tuple[str, ...] = ()) -> str:
    """The selection a record ran: ``scope.select``, with ``+heads`` when it voted with retrieval
    heads, then ``name=value`` of each of ``settings`` (the scope settings that differ between the
    report's records, so runs of one selection at several spans stay apart)."""
    label = record.get("select", "paper") + ("+heads" if record.get("heads") else "")
    names = dict(SETTINGS)
    return " ".join([label] + [f"{names[k]}={record.get(k)}" for k in settings])


def varying_settings(records: list[dict]) -> tuple[str, ...]:
    """The scope settings (:data:`SETTINGS`) whose values differ between ``records``."""
    return tuple(k for k, _ in SETTINGS if len({repr(r.get(k)) for r in records}) > 1)


def variants_table(records: list[dict]) -> str:
    """Accuracy, recall, hit share and prefill time per task, length and selection (with the scope
    settings that differ between the records)."""
    runs = [r for r in records if r["mode"] == "reattention"]
    settings = varying_settings(runs)
    cells = defaultdict(list)
    for r in runs:
        cells[(r["task"], r["len"], variant(r, settings))].append(r)
    lines = [
        "| task | len | select | score | n | recall | top-k hit | median rank | prefill s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (task, n, select), rs in sorted(cells.items()):
        recall = _mean(_mean(r["scope_recall"]) if r.get("scope_recall") else None for r in rs)
        scoring = rs[0].get("select", "paper")
        ranks = [x for r in rs for layer in _ranks(r, scoring) for x in layer]
        lines.append(
            f"| {task} | {format_count(n)} | {select} | {100 * _mean(r['score'] for r in rs):.1f} | {len(rs)} "
            f"| {_fmt(recall)} | {_fmt(_mean(_hit(r, scoring) for r in rs))} "
            f"| {_fmt(quantiles(ranks)[1], 0)} | {_fmt(_mean(r['prefill_seconds'] for r in rs))} |"
        )
    return "\n".join(lines)


def ceiling_table(records: list[dict]) -> str:
    """Full attention's accuracy per task and length (the in-window reference of the targets)."""
    cells = defaultdict(list)
    for r in records:
        if r["mode"] == "full":
            cells[(r["task"], r["len"])].append(r["score"])
    lines = ["| task | len | full-attention score | n |", "| --- | --- | ---: | ---: |"]
    for (task, n), s in sorted(cells.items()):
        lines.append(f"| {task} | {format_count(n)} | {100 * _mean(s):.1f} | {len(s)} |")
    return "\n".join(lines)


def _probed(records: list[dict]) -> list[dict]:
    """The records whose forwards the scorings are compared on: the paper's selection."""
    return [r for r in records if r.get("probe_ranks") and variant(r) == "paper"]


def scorings_table(records: list[dict]) -> str:
    """Every scoring on the same forwards: share of (layer, head) with rank < k, rank quantiles."""
    cells = defaultdict(lambda: defaultdict(list))
    topk = {}
    for r in _probed(records):
        key = (haystack_of(r["task"]), r["len"])
        topk[key] = r["topk"]
        for scoring in r["probe_ranks"]:
            cells[key][scoring].extend(x for layer in _ranks(r, scoring) for x in layer)
    lines = [
        "| haystack | len | scoring | rank < k | p10 | median | p90 | (layer, head) pairs |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted(cells):
        for scoring, ranks in cells[key].items():
            p10, p50, p90 = quantiles(ranks)
            hit = sum(x < topk[key] for x in ranks) / max(len(ranks), 1)
            lines.append(
                f"| {key[0]} | {format_count(key[1])} | {scoring} | {hit:.3f} | {p10} | {p50} | {p90} | {len(ranks)} |"
            )
    return "\n".join(lines)


def layers_table(records: list[dict], scoring: str = "paper") -> str:
    """Rank quantiles per layer (over heads and samples), prose against noise, per length."""
    cells = defaultdict(lambda: defaultdict(list))  # (len) -> (haystack, layer) -> ranks
    for r in _probed(records):
        for i, layer in enumerate(r["probe_ranks"].get(scoring, [])):
            if layer is not None:
                cells[r["len"]][(haystack_of(r["task"]), i)].extend(layer)
    out = []
    for n in sorted(cells):
        layers = sorted({i for _, i in cells[n]})
        out += [
            f"{format_count(n)}, scoring {scoring}: median [p10, p90] rank per layer",
            "",
            "| layer | prose | noise |",
            "| ---: | --- | --- |",
        ]
        for i in layers:
            row = []
            for h in ("prose", "noise"):
                p10, p50, p90 = quantiles(cells[n].get((h, i), []))
                row.append("-" if math.isnan(p50) else f"{p50} [{p10}, {p90}]")
            out.append(f"| {i} | {row[0]} | {row[1]} |")
        out.append("")
    return "\n".join(out)


def heads_table(records: list[dict], scoring: str = "paper", top: int = 12) -> str:
    """The (layer, head) pairs with the lowest median rank over the prose samples."""
    per = head_shares(records, scoring)
    if not per:
        return "(no prose samples with a middle needle)"
    topk = _probed(records)[0]["topk"]
    rows = sorted(per.items(), key=lambda kv: (statistics.median(kv[1]), kv[0]))[:top]
    lines = [
        f"| layer | head | median rank | share with rank < {topk} | samples |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for (i, h), xs in rows:
        lines.append(
            f"| {i} | {h} | {statistics.median(xs)} | {sum(x < topk for x in xs) / len(xs):.2f} | {len(xs)} |"
        )
    return "\n".join(lines)


def head_shares(records: list[dict], scoring: str = "paper") -> dict[tuple[int, int], list[int]]:
    """``(layer, head) -> ranks`` over the prose samples' probes."""
    per = defaultdict(list)
    for r in _probed(records):
        if haystack_of(r["task"]) == "prose":
            for i, layer in enumerate(r["probe_ranks"].get(scoring, [])):
                for h, x in enumerate(layer or []):
                    per[(i, h)].append(x)
    return per


def retrieval_heads(records: list[dict], min_share: float, scoring: str = "paper") -> dict:
    """The ``scope.heads`` file's content: per layer, the heads whose rank is below the records' top-k
    in at least ``min_share`` of the prose samples."""
    topk = {r["topk"] for r in _probed(records)}
    if len(topk) != 1:
        raise ValueError(f"the records mix topk values {sorted(topk)}: calibrate on one setting")
    k = topk.pop()
    heads = defaultdict(list)
    per = head_shares(records, scoring)
    for (i, h), xs in sorted(per.items()):
        if sum(x < k for x in xs) >= min_share * len(xs):
            heads[str(i)].append(h)
    samples = {(r["task"], r["len"], r["sample"], r["seed"]) for r in _probed(records)}
    return {"heads": dict(heads), "min_share": min_share, "topk": k, "scoring": scoring,
            "prose_samples": sum(haystack_of(t) == "prose" for t, *_ in samples)}  # fmt: skip


def fused_table(records: list[dict]) -> str:
    """Per haystack, length and fused ranking: per layer, share of samples with rank < recall_clip, median rank."""
    cells = defaultdict(lambda: defaultdict(list))  # (haystack, len, name) -> layer -> ranks
    clip = {}
    for r in _probed(records):
        for name, layers in r.get("probe_fused", {}).items():
            key = (haystack_of(r["task"]), r["len"], name)
            clip[key] = r["recall_clip"]
            for i, x in enumerate(layers):
                if x is not None:
                    cells[key][i].append(x)
    if not cells:
        return "(no fused ranks in these records)"
    layers = sorted({i for c in cells.values() for i in c})
    lines = [
        "Each cell: share of samples with rank < recall_clip / median rank (samples in the last column).",
        "",
        "| haystack | len | fused | " + " | ".join(f"L{i}" for i in layers) + " | samples |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in layers) + " | ---: |",
    ]
    for key in sorted(cells):
        row = []
        for i in layers:
            xs = cells[key].get(i, [])
            row.append(f"{sum(x < clip[key] for x in xs) / len(xs):.2f} / {quantiles(xs)[1]}" if xs else "-")
        n = max(len(xs) for xs in cells[key].values())
        lines.append(f"| {key[0]} | {format_count(key[1])} | {key[2]} | " + " | ".join(row) + f" | {n} |")
    return "\n".join(lines)


def audit_table(records: list[dict]) -> str:
    """The FP8 audit per model, task, length and margin (rows and scopes pooled over samples)."""
    cells = defaultdict(list)
    for r in records:
        for m, a in r.get("fp8_audit", {}).items():
            cells[(r["model"], r["task"], r["len"], int(m))].append(a)
    lines = [
        "| model | task | len | margin | n | rows equal | scope Jaccard | least Jaccard | rows | scopes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (model, task, n, m), audits in sorted(cells.items()):
        rows, scopes = sum(a["rows"] for a in audits), sum(a["scopes"] for a in audits)
        equal = sum(a["rows_equal"] * a["rows"] for a in audits) / max(rows, 1)
        jaccard = sum(a["jaccard"] * a["scopes"] for a in audits) / max(scopes, 1)
        least = min(a["jaccard_min"] for a in audits)
        lines.append(
            f"| {model} | {task} | {format_count(n)} | {m} | {len(audits)} | {equal:.3f} | {jaccard:.3f} "
            f"| {least:.3f} | {rows} | {scopes} |"
        )
    return "\n".join(lines)


def report(records: list[dict]) -> str:
    audit = (
        ["## FP8 scoring against exact (--fp8-audit)", audit_table(records)]
        if any("fp8_audit" in r for r in records)
        else []
    )
    return "\n\n".join(
        [
            "## Variants (same samples, one process per selection)",
            variants_table(records),
            "## Full attention (in-window reference)",
            ceiling_table(records),
            "## Scorings ranked on the same forwards (select=paper runs)",
            scorings_table(records),
            "## Per layer",
            layers_table(records),
            "## Heads that rank the answer best on prose",
            heads_table(records),
            "## Heads fused per layer and over layers (paper scoring)",
            fused_table(records),
            *audit,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "results", nargs="+", help="results.jsonl files of ruler.py --diagnose (or --fp8-audit) runs"
    )
    p.add_argument("--out", default=None, help="write the tables to this Markdown file too")
    p.add_argument(
        "--heads-out",
        default=None,
        help="write a scope.heads file: per layer, the heads whose rank is below top-k in at least "
        "--min-share of the prose samples (calibrate on other seeds than those you evaluate on)",
    )
    p.add_argument("--min-share", type=float, default=0.5)
    args = p.parse_args(argv)
    records = [r for f in args.results for r in read_records(Path(f))]
    text = report(records)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.heads_out:
        found = retrieval_heads(records, args.min_share)
        found["from"] = args.results
        Path(args.heads_out).write_text(json.dumps(found, indent=1) + "\n")
        print(f"{sum(map(len, found['heads'].values()))} retrieval heads -> {args.heads_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
