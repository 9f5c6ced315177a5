"""Needle-in-a-haystack beyond the model's trained window, several modes side by side.

    python launch/niah.py --model smollm2-135m --len 16K --depths 0.1,0.5,0.9 --mode full,streaming,reattention
    torchrun --nproc_per_node 2 launch/niah.py --model smollm2-135m --len 16K --depths 0.1,0.5,0.9 --mode reattention

Writes ``OUT/results.jsonl`` (one line per trial, appended as it finishes; a re-run with the same
``--out`` skips trials already recorded), ``OUT/heatmap.png``, ``OUT/profile.json`` (per-phase time of
every trial on every rank) and prints a per-mode table.
Any config field can be overridden: ``--scope.topk=8``, ``--model.dtype=bf16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dist_reattn.cli import add_check_flag, check_out_dir, parse_modes, report, run_main
from dist_reattn.config import (
    MODES,
    ConfigError,
    add_model_args,
    config_for_model,
    format_count,
    parse_args_with_overrides,
    parse_count,
)
from dist_reattn.distributed import init_from_env, shutdown
from dist_reattn.models.load import load_tokenizer, resolve
from dist_reattn.report.measure import profile_line
from dist_reattn.report.niah_plots import plot_heatmap, summary_table
from dist_reattn.report.results import append_record, read_records
from dist_reattn.runtime import build_engine, check_windows, plan_resume, prepare, resume_settings
from dist_reattn.tasks.niah import HAYSTACKS, build_sample, is_correct, min_length
from dist_reattn.trial import Harness

log = logging.getLogger("niah")


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides: --section.field=value, e.g. --scope.topk=8 --scope.local=2048 --model.dtype=bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--len", default="16K", help="prompt lengths, comma list: 16K,32K (K=1024, M=1024*1024) or ints"
    )
    p.add_argument("--depths", default="0.5", help="needle depths in [0, 1], comma list")
    p.add_argument("--mode", default="full,reattention", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--trials", type=int, default=1, help="trials (different needles) per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="noise", choices=HAYSTACKS)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default=None, help="output directory (default runs/niah-<time>)")
    add_check_flag(p)
    return parse_args_with_overrides(p, argv)


def validate(args):
    """Checks every flag before anything heavy; returns (config, lengths, depths, modes)."""
    lengths = [parse_count(x) for x in args.len.split(",")]
    try:
        depths = [float(x) for x in args.depths.split(",")]
    except ValueError as e:
        raise ConfigError(f"--depths {args.depths!r}: give fractions in [0, 1], e.g. 0.1,0.5,0.9") from e
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"--depths {args.depths!r}: every depth must be in [0, 1]")
    modes = parse_modes(args.mode)
    if args.trials < 1 or args.max_new_tokens < 1:
        raise ConfigError("--trials and --max-new-tokens must be >= 1")
    cfg = config_for_model(args.model, args.config, args.overrides)
    for m in modes:
        dataclasses.replace(cfg.scope, mode=m).validate()
    args.out = args.out or f"runs/niah-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_dir(args.out)
    resolve(cfg.model.path)  # a missing or broken model is found here, before any process group
    return cfg, lengths, depths, modes


def trial_key(r: dict) -> tuple:
    return (r["mode"], r["target_len"], round(r["depth"], 6), r["trial"], r["seed"])


def write_profiles(out: Path) -> None:
    """``OUT/profile.json``: every recorded trial's per-phase profile, per rank, keyed like the results."""
    profiles = [
        {
            "key": dict(zip(("mode", "target_len", "depth", "trial", "seed"), trial_key(r), strict=True)),
            "world": r.get("world"),
            "prefill_tok_s": r.get("prefill_tok_s"),
            "decode_ms_per_token": r.get("decode_ms_per_token"),
            "ranks": r.get("ranks"),
        }
        for r in read_records(out / "results.jsonl")
        if "ranks" in r
    ]
    tmp = out / "profile.json.tmp"
    tmp.write_text(json.dumps(profiles, indent=1))
    tmp.replace(out / "profile.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, lengths, depths, modes = validate(args)
    except ConfigError as e:
        return report(e)  # every rank validated the same flags and exits 2; rank 0 says why
    if args.check:
        return 0
    comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING, format="%(message)s")
    try:
        return run(args, cfg, lengths, depths, modes, comm)
    finally:
        shutdown(comm)


def run(args, cfg, lengths, depths, modes, comm) -> int:
    try:
        capacity = max(lengths) + args.max_new_tokens
        plan_mode = "full" if "full" in modes else modes[0]  # the widest: the plan bounds every mode
        prep = prepare(
            dataclasses.replace(cfg, scope=dataclasses.replace(cfg.scope, mode=plan_mode)), capacity, comm
        )
        check_windows(cfg.scope, modes, prep.spec.window, capacity)
        tokenizer = load_tokenizer(prep.source)
        shortest = min_length(tokenizer, args.haystack)
        if min(lengths) < shortest:
            raise ConfigError(
                f"--len {min(lengths)} is too short to hold the needle and question: use >= {shortest}"
            )
    except ConfigError as e:
        return report(e, comm.rank)
    log.info(
        f"model {prep.source} ({prep.spec.arch}, window {prep.spec.window}) on {prep.device} {prep.dtype}"
    )
    log.info(f"memory plan for {capacity} tokens on {comm.world} rank(s): {prep.plan.describe()}")

    wanted = [(n, d, t, m) for n in lengths for d in depths for t in range(args.trials) for m in modes]
    try:
        out, todo = plan_resume(
            comm,
            args.out,
            wanted,
            trial_key,
            lambda w: (w[3], w[0], round(w[1], 6), w[2], args.seed),
            {**resume_settings(cfg, prep), "haystack": args.haystack},
        )
    except ConfigError as e:
        return report(e, comm.rank)
    results = out / "results.jsonl"

    engine = build_engine(cfg, prep, capacity, comm)
    harness = Harness(engine, cfg, prep)
    bar = tqdm(
        total=sum(n for n, *_ in todo), unit="tok", unit_scale=True, disable=comm.rank != 0, smoothing=0.1
    )
    sample_key, sample = None, None
    for n, depth, trial, mode in todo:
        if sample_key != (n, depth, trial):
            sample_key = (n, depth, trial)
            sample = build_sample(
                tokenizer, n, depth, seed=args.seed * 1_000_003 + trial, haystack=args.haystack
            )
        bar.set_description(f"{mode} {format_count(n)} depth {depth}")
        scope = dataclasses.replace(cfg.scope, mode=mode)
        gen, measured = harness.run(sample.input_ids, args.max_new_tokens, scope, on_chunk=bar.update)
        answer = tokenizer.decode(gen.tokens, skip_special_tokens=True)
        record = {
            "len": sample.length,
            "target_len": n,
            "depth": depth,
            "trial": trial,
            "seed": args.seed,
            "needle": sample.needle,
            "correct": is_correct(answer, sample),
            "answer": answer,
            "haystack": args.haystack,
            **measured.as_dict(),
        }
        if comm.rank == 0:
            append_record(results, record)
            write_profiles(out)
        bar.update(n - sample.length)  # the bar counts requested lengths; prompts may be a few tokens short
        bar.write(
            f"{mode:12s} len {sample.length:>8d} depth {depth:.2f}: {'OK ' if record['correct'] else 'MISS'} "
            f"{answer.strip()[:40]!r} (needle {sample.needle}, {measured.seconds:.1f} s, "
            f"{gen.prefill_tok_s:.0f} tok/s prefill, {measured.decode_ms_per_token:.1f} ms/token decode)\n"
            f"    {profile_line(gen.profile)}"
        )
    bar.close()
    if comm.rank == 0:
        records = read_records(results)
        print(summary_table(records))
        plot_heatmap(records, out / "heatmap.png")
        print(f"results: {results}\nheatmap: {out / 'heatmap.png'}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
