"""Our ReAttention prefill against plain full attention, same model, same GPU, one process.

    python launch/bench_prefill.py --len 64K,128K,256K,1M --out launch/results/bench_prefill-H100-2026-11-24

For every length: our engine's chunked prefill in ``reattention`` mode (per-phase profile included)
and the unmodified Hugging Face model in one forward through SDPA (``attn_implementation="sdpa"``,
causal, no KV cache kept, last logits only): the ordinary way to run full attention, and the fastest
one. Where full attention does not fit, its time is extrapolated from the lengths that ran by a
least-squares fit ``t = a N + b N^2`` (linear work in projections and MLP, quadratic in attention);
the table marks those rows. Prompts are NIAH haystacks (``noise``) so the retrieval sees real text.
Writes ``OUT/results.jsonl`` (one line per length) and ``OUT/README.md`` (the table and the command).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time

import torch

from dist_reattn.cli import check_out_dir, run_main
from dist_reattn.config import (
    ConfigError,
    add_model_args,
    config_for_model,
    format_count,
    parse_args_with_overrides,
    parse_count,
)
from dist_reattn.distributed import Comm
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import load_model, load_tokenizer
from dist_reattn.report.measure import profile_line
from dist_reattn.report.results import append_record
from dist_reattn.runtime import prepare
from dist_reattn.tasks.niah import build_sample


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def fit_full(points: list[tuple[int, float]]):
    """Least squares ``t = a N + b N^2`` through (N, seconds); returns a predictor, or None."""
    if len(points) < 2:
        return None
    n = torch.tensor([p[0] for p in points], dtype=torch.float64)
    t = torch.tensor([p[1] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(torch.stack([n, n * n], 1), t[:, None]).solution[:, 0]
    return lambda N: float(coef[0] * N + coef[1] * N * N)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--len", default="64K,128K", help="comma list of prompt lengths (K = 1024)")
    p.add_argument("--warmup", default="16K", help="a first prefill of this length, not timed")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-full", action="store_true", help="skip full attention (extrapolated from the fit)")
    p.add_argument("--no-ours", action="store_true", help="time full attention only")
    args = parse_args_with_overrides(p, argv)
    if not torch.cuda.is_available():
        raise ConfigError("bench_prefill.py needs a CUDA GPU and none is visible: run it on a GPU machine")
    lengths = [parse_count(x) for x in args.len.split(",")]
    cfg = config_for_model(args.model, args.config, args.overrides)
    out = check_out_dir(args.out)
    prep = prepare(cfg, max(lengths), Comm.single())
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(prep.source)
    hf = load_model(prep.source, prep.dtype, prep.device)
    plain = copy.deepcopy(hf)
    plain.set_attn_implementation("sdpa")
    engine = Engine(ReAttnModel(hf), cfg.scope, max(lengths))
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, {prep.dtype}, plan: {prep.plan.describe()}")

    def ours(ids):
        engine.reset()
        return engine.prefill(torch.tensor(ids))

    def full(ids):
        with torch.no_grad():
            return plain(
                input_ids=torch.tensor(ids, device=prep.device)[None], use_cache=False, logits_to_keep=1
            ).logits

    warm = build_sample(tok, parse_count(args.warmup), 0.5, seed=1).input_ids
    if not args.no_ours:
        ours(warm)
    if not args.no_full:
        full(warm)
    rows = []
    for n in lengths:
        ids = build_sample(tok, n, 0.5, seed=0).input_ids
        torch.cuda.reset_peak_memory_stats()
        row = {"len": len(ids), "ours_s": None, "full_s": None, "full_note": "skipped"}
        if not args.no_ours:
            t_ours, _ = timed(lambda ids=ids: ours(ids))
            prof = engine.profile.as_dict()
            row.update(
                ours_s=round(t_ours, 3),
                ours_tok_s=round(len(ids) / t_ours, 1),
                ours_peak_bytes=torch.cuda.max_memory_allocated(),
                profile=prof,
            )
            print(
                f"{format_count(n)}: ours {t_ours:.2f} s ({len(ids) / t_ours:,.0f} tok/s); {profile_line(prof)}"
            )
        if not args.no_full:
            try:
                torch.cuda.empty_cache()
                t_full, _ = timed(lambda ids=ids: full(ids))
                row.update(full_s=round(t_full, 3), full_note="measured")
                print(f"{format_count(n)}: full attention {t_full:.2f} s")
            except torch.OutOfMemoryError:
                row["full_note"] = "out of memory"
                print(f"{format_count(n)}: full attention out of memory")
            torch.cuda.empty_cache()
        rows.append(row)
        append_record(
            out / "results.jsonl", {**row, "gpu": gpu, "dtype": str(prep.dtype), "scope": vars(cfg.scope)}
        )
    predict = fit_full([(r["len"], r["full_s"]) for r in rows if r["full_s"]])
    lines = [
        f"# Prefill: ReAttention vs full attention, {gpu}, {datetime.date.today()}",
        "",
        "```",
        "python launch/bench_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"torch {torch.__version__}, {platform.python_version()}, {prep.dtype}; scope {vars(cfg.scope)}.",
        "Full attention: the unmodified HF model, one forward, SDPA causal, no KV cache kept.",
        "Extrapolated rows (`*`) use a least-squares fit t = a N + b N^2 over the measured rows.",
        "",
        "| tokens | ours (s) | ours tok/s | full attention (s) | ours / full | ours peak GiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["ours_s"] is None:
            lines.append(f"| {r['len']:,} | - | - | {r['full_s'] or r['full_note']} | - | - |")
            continue
        full_s, mark = r["full_s"], ""
        if full_s is None and predict is not None:
            full_s, mark = predict(r["len"]), "*"
        ratio = f"{r['ours_s'] / full_s:.2f}{mark}" if full_s else "-"
        full_txt = f"{full_s:.2f}{mark}" if full_s else r["full_note"]
        lines.append(
            f"| {r['len']:,} | {r['ours_s']:.2f} | {r['ours_tok_s']:,.0f} | {full_txt} | {ratio} | "
            f"{r['ours_peak_bytes'] / 2**30:.1f} |"
        )
    lines += ["", "Per-phase prefill time of ours (seconds):", ""]
    for r in rows:
        if "profile" in r:
            lines.append(f"* {r['len']:,}: {profile_line(r['profile'])}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
