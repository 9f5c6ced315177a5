"""Batch jobs: answer every task of a JSONL file with one model load; resumable, pre-emptible.

    python launch/batch.py --in tasks.jsonl --out answers.jsonl --model smollm2-135m
    torchrun --nproc_per_node 2 launch/batch.py --in tasks.jsonl --out answers.jsonl --scope.topk=8
    python launch/make_batch_tasks.py --len 16K --n 5 --dir runs/batch16k   # NIAH tasks to try it on

Each task line: {"id": ..., "context": "..." | "context_file": "path", "question": "...",
optional "max_new_tokens": N, "overrides": {"scope.topk": 8}, "meta": {...}}. context_file paths are
relative to the task file's folder; only scope.* may vary per task (the model is loaded once).

Each task gets one line in --out: an answer record, or an error record {"id", "line", "error"} for
a malformed task (bad JSON, missing id or question, both or neither of context/context_file, a
missing file, a bad override, a prompt that cannot fit); a line with no usable id is named "line:N".
Re-running the same command resumes: every id already in --out is skipped, error records included,
so a bad line is reported once, not retried (fix it and delete its record to retry it).
SIGTERM (Slurm pre-emption, scancel) stops at once, keeps every record written, abandons the task
in progress, and exits with status 143; re-run the same command to go on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dist_reattn.config import ConfigError, add_model_args, config_for_model, parse_args_with_overrides
from dist_reattn.distributed import init_from_env, shutdown
from dist_reattn.tasks.batch import Preempted, plan_job, run_tasks, stop_on_sigterm

log = logging.getLogger("batch")
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1]
        + "\nConfig overrides: --section.field=value, e.g. --scope.topk=8 --scope.local=2048 --model.dtype=bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--in", dest="tasks", required=True, help="task file (JSONL, one task per line)")
    p.add_argument("--out", required=True, help="output file (JSONL, one record per task, appended)")
    add_model_args(p)
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="default for tasks without their own (default 64)"
    )
    return parse_args_with_overrides(p, argv)


def validate(args):
    """Checks every flag before anything heavy; returns (config, task file, output file)."""
    tasks, out = Path(args.tasks), Path(args.out)
    if not tasks.is_file():
        raise ConfigError(f"--in {args.tasks!r}: no such file")
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a directory: give a file, e.g. {out / 'answers.jsonl'}")
    if out.resolve() == tasks.resolve():
        raise ConfigError("--out must not be the --in file")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    cfg = config_for_model(args.model, args.config, args.overrides)
    return cfg, tasks, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, tasks, out = validate(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING, format="%(message)s")
    resume = f"re-run the same command to resume (ids already in {out} are skipped)"
    try:
        try:
            if comm.rank == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
            plan, prep = plan_job(tasks, out, cfg, args.max_new_tokens, comm)
        except ConfigError as e:
            if comm.rank == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        except Preempted:
            if comm.rank == 0:
                print(f"stopped by SIGTERM before any task ran; {resume}", file=sys.stderr)
            return PREEMPTED_EXIT
        log.info(
            f"{plan.total} tasks in {tasks}: {plan.skipped} already in {out}, {plan.errors} errors recorded "
            f"now, {len(plan.todo)} to run"
        )
        if prep is not None:
            log.info(
                f"model {prep.source} ({prep.spec.arch}) on {prep.device} {prep.dtype}, {comm.world} rank(s)"
            )
            log.info(f"memory plan for {plan.capacity} tokens: {prep.plan.describe()}")

        def on_answer(r: dict) -> None:
            log.info(
                f"{r['id']}: {r['prompt_tokens']} tokens, {r['seconds']:.1f} s "
                f"({r['prefill_tok_s']:.0f} tok/s prefill): {r['answer'].strip()[:60]!r}"
            )

        result = run_tasks(plan, prep, out, cfg, comm, on_answer) if prep is not None else None
    finally:
        shutdown(comm)
    answered = result.answered if result else 0
    if result and result.preempted:
        if comm.rank == 0:
            print(
                f"stopped by SIGTERM: {answered} of {len(plan.todo)} tasks answered this run, task "
                f"{result.abandoned!r} abandoned; records in {out} are intact; {resume}",
                file=sys.stderr,
            )
        return PREEMPTED_EXIT
    if comm.rank == 0:
        print(
            f"done: {answered} answered, {plan.errors} errors, {plan.skipped} already there; "
            f"{plan.skipped + answered + plan.errors} of {plan.total} tasks in {out}"
        )
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
