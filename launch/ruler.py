"""RULER's synthetic tasks beyond the model's trained window, several modes side by side.

    python launch/ruler.py --model smollm2-135m --tasks niah,vt --len 8K,16K --mode full,streaming,reattention --samples 3
    torchrun --nproc_per_node 2 launch/ruler.py --tasks niah --len 128K --mode reattention

``--tasks`` takes RULER's names (niah_single_1 ... niah_multiquery, vt, cwe, fwe), ``niah`` for the
eight NIAH tasks, or ``all``. ``--len`` is RULER's sequence length: the prompt plus the task's tokens
to generate. The in-window ceiling length (``--ceiling``, default 4K) is run in full attention for
every task as well, and the table's retention column divides each score by that one.
Writes ``OUT/results.jsonl`` (one line per sample and mode, appended as it finishes; a re-run with the
same ``--out`` skips samples already recorded), ``OUT/table.md`` and ``OUT/scores.png``, and prints
the table. Any config field can be overridden: ``--scope.topk=8``, ``--model.dtype=bf16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import torch
from tqdm import tqdm

from dist_reattn.cli import check_out_dir, parse_modes, report, run_main
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
from dist_reattn.probe import ScoringAudit, SelectionProbe
from dist_reattn.report.measure import profile_line
from dist_reattn.report.results import append_record, read_records
from dist_reattn.report.ruler_report import plot_scores, summary_table
from dist_reattn.runtime import build_engine, check_windows, plan_resume, prepare, resume_settings
from dist_reattn.select import scope_recall
from dist_reattn.tasks.ruler import TASKS, answer_tokens, build_sample, min_length, parse_tasks, score
from dist_reattn.trial import Harness

log = logging.getLogger("ruler")


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides: --section.field=value, e.g. --scope.topk=8 --scope.local=2048 --model.dtype=bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--tasks", default="niah,vt", help=f"comma list of niah, all, or {', '.join(TASKS)}")
    p.add_argument(
        "--len", default="8K", help="sequence lengths (prompt + generated), comma list: 8K,16K or ints"
    )
    p.add_argument("--mode", default="full,reattention", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--samples", type=int, default=1, help="samples per task x length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ceiling",
        default="4K",
        help="in-window length also run in full attention for every task (retention = score / its score); 'none' to skip",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="instead of each task's RULER default")
    p.add_argument(
        "--recall",
        action="store_true",
        help="also record scope_recall: per retrieving layer, the fraction of the answer's tokens in the "
        "scope that chose the first answer token (one process only)",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="--recall, plus the selection probe: per layer and query head, the rank of the answer's best "
        "key among the middle keys at that step, under every scope.select scoring (one process only)",
    )
    p.add_argument(
        "--fp8-audit",
        default=None,
        metavar="MARGINS",
        help="with --scope.scoring=fp8: also audit the FP8 selection against exact for these margins "
        "(comma list, e.g. 0,1,2,4,8): on every 16th prefill chunk, every layer, the fraction of "
        "rows whose top-k is exact and the Jaccard overlap of the scope with the exact one, into "
        "each record's fp8_audit (one process only)",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/ruler-<time>)")
    return parse_args_with_overrides(p, argv)


def validate(args):
    """Checks every flag before anything heavy; returns (config, tasks, cells)."""
    lengths = [parse_count(x) for x in args.len.split(",")]
    tasks = parse_tasks(args.tasks)
    modes = parse_modes(args.mode)
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    ceiling = None if args.ceiling.strip().lower() == "none" else parse_count(args.ceiling)
    cfg = config_for_model(args.model, args.config, args.overrides)
    args.fp8_audit = audit_margins(args.fp8_audit, cfg.scope)
    for m in {*modes, "full"}:
        dataclasses.replace(cfg.scope, mode=m).validate()
    args.out = args.out or f"runs/ruler-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_dir(args.out)
    resolve(cfg.model.path)  # a missing or broken model is found here, before any process group
    # (length, modes): the ceiling runs in full attention whatever --mode says.
    cells = {n: list(modes) for n in lengths}
    if ceiling is not None:
        cells[ceiling] = ["full", *(m for m in cells.get(ceiling, []) if m != "full")]
    return cfg, tasks, sorted(cells.items()), ceiling


def audit_margins(text: str | None, scope) -> list[int] | None:
    """``--fp8-audit``'s margins, checked against the scope (None: no audit)."""
    if text is None:
        return None
    if scope.scoring != "fp8":
        raise ConfigError("--fp8-audit audits scope.scoring=fp8: add --scope.scoring=fp8")
    try:
        margins = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(
            f"--fp8-audit {text!r}: give margins as a comma list of ints, e.g. 0,2,4,8"
        ) from None
    from dist_reattn.kernels.fp8 import MAX_KEEP

    bad = [m for m in margins if m < 0 or scope.topk + m > MAX_KEEP]
    if bad:
        raise ConfigError(
            f"--fp8-audit margin {bad[0]} is outside 0..{MAX_KEEP - scope.topk} (topk {scope.topk} + margin <= {MAX_KEEP})"
        )
    return margins


def record_key(r: dict) -> tuple:
    return (r["task"], r["len"], r["mode"], r["sample"], r["seed"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, tasks, cells, ceiling = validate(args)
    except ConfigError as e:
        return report(e)  # every rank validated the same flags and exits 2; rank 0 says why
    comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING, format="%(message)s")
    try:
        return run(args, cfg, tasks, cells, ceiling, comm)
    finally:
        shutdown(comm)


def run(args, cfg, tasks, cells, ceiling, comm) -> int:
    try:
        longest, modes_there = cells[-1]
        capacity = longest + (args.max_new_tokens or 0)
        plan_mode = (
            "full" if "full" in modes_there else modes_there[0]
        )  # the widest: the plan bounds every mode
        prep = prepare(
            dataclasses.replace(cfg, scope=dataclasses.replace(cfg.scope, mode=plan_mode)), capacity, comm
        )
        for n, modes_at in cells:
            check_windows(cfg.scope, modes_at, prep.spec.window, n + (args.max_new_tokens or 0))
        if ceiling is not None and ceiling > prep.spec.window:
            raise ConfigError(
                f"--ceiling {ceiling} is beyond the model's window ({prep.spec.window}): give a length inside it"
            )
        args.recall = args.recall or args.diagnose
        if args.recall and comm.world > 1:
            raise ConfigError(
                "--recall and --diagnose need one process: the scopes are recorded by the rank that attends"
            )
        if args.fp8_audit and (comm.world > 1 or args.diagnose):
            raise ConfigError(
                "--fp8-audit needs one process and no --diagnose (both use the engine's probe hook)"
            )
        tokenizer = load_tokenizer(prep.source)
        for task in tasks:
            for n, _ in cells:
                shortest = min_length(tokenizer, task, n)
                if n < shortest:
                    raise ConfigError(f"--len {n} is too short for RULER {task}: use >= {shortest}")
    except ConfigError as e:
        return report(e, comm.rank)
    log.info(
        f"model {prep.source} ({prep.spec.arch}, window {prep.spec.window}) on {prep.device} {prep.dtype}"
    )
    log.info(f"memory plan for {capacity} tokens on {comm.world} rank(s): {prep.plan.describe()}")

    wanted = [(t, n, i, m) for t in tasks for n, modes in cells for i in range(args.samples) for m in modes]
    try:
        out, todo = plan_resume(
            comm,
            args.out,
            wanted,
            record_key,
            lambda w: (w[0], w[1], w[3], w[2], args.seed),
            resume_settings(cfg, prep),
        )
    except ConfigError as e:
        return report(e, comm.rank)
    results = out / "results.jsonl"

    cfg.debug.record_selection = args.recall
    engine = build_engine(cfg, prep, capacity, comm)
    harness = Harness(engine, cfg, prep)
    bar = tqdm(
        total=sum(n for _, n, *_ in todo), unit="tok", unit_scale=True, disable=comm.rank != 0, smoothing=0.1
    )
    sample_key, sample, where = None, None, None
    for task, n, i, mode in todo:
        if sample_key != (task, n, i):
            sample_key = (task, n, i)
            sample = build_sample(tokenizer, task, n, seed=args.seed * 1_000_003 + i)
            where = answer_tokens(tokenizer, sample) if args.recall else None  # once for every mode
        engine.record_from = sample.prompt_tokens  # the step that picks the first answer token
        scope = dataclasses.replace(cfg.scope, mode=mode)
        probe = audit = None
        if args.diagnose and mode == "reattention":
            probe = engine.probe = SelectionProbe(sample.prompt_tokens, where, scope)
        if args.fp8_audit and mode == "reattention":
            audit = engine.probe = ScoringAudit(args.fp8_audit)
        bar.set_description(f"{task} {mode} {format_count(n)}")
        new = args.max_new_tokens or sample.max_new_tokens
        gen, measured = harness.run(sample.input_ids, new, scope, on_chunk=bar.update)
        answer = tokenizer.decode(gen.tokens, skip_special_tokens=True)
        value = score(answer, sample.answers, sample.metric)
        recall = (
            {"scope_recall": scope_recall(engine.selections, sample.prompt_tokens, where)} if where else {}
        )
        if probe is not None:
            engine.probe = None
            recall.update(probe_ranks=probe.ranks, probe_fused=probe.fused, probe_middle=probe.middle)
        if audit is not None:
            engine.probe = None
            recall["fp8_audit"] = audit.summary()
        record = {
            "task": task,
            "len": n,
            "sample": i,
            "seed": args.seed,
            "score": value,
            "metric": sample.metric,
            "answers": sample.answers,
            "answer": answer,
            "haystack_units": sample.units,
            "max_new_tokens": new,
            "ceiling_len": ceiling,
            **measured.as_dict(),
            **recall,
        }
        if comm.rank == 0:
            append_record(results, record)
        bar.update(n - sample.prompt_tokens)  # the bar counts requested lengths
        bar.write(
            f"{task:16s} {mode:12s} len {format_count(n):>5s}: score {value:.2f} {answer.strip()[:60]!r} "
            f"(want {', '.join(sample.answers)[:60]}; {measured.seconds:.1f} s, {gen.prefill_tok_s:.0f} tok/s prefill)\n"
            f"    {profile_line(gen.profile)}"
        )
    bar.close()
    if comm.rank == 0:
        records = read_records(results)
        table = summary_table(records, ceiling)
        (out / "table.md").write_text(table + "\n")
        plot_scores(records, out / "scores.png", ceiling)
        print(table)
        print(f"results: {results}\ntable: {out / 'table.md'}\nplot: {out / 'scores.png'}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
