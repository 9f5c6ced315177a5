"""Batch jobs: answer every task of a JSONL file with one model load; resumable, pre-emptible.

    python launch/batch.py --in tasks.jsonl --out answers.jsonl --model smollm2-135m
    torchrun --nproc_per_node 2 launch/batch.py --in tasks.jsonl --out answers.jsonl --scope.topk=8
    python launch/make_batch_tasks.py --len 16K --n 5 --dir runs/batch16k   # NIAH tasks to try it on

Each task line: {"id": ..., "context": "..." | "context_file": "path", "question": "...",
optional "max_new_tokens": N, "overrides": {"scope.topk": 8}, "meta": {...}}. context_file paths are
relative to the context root (--context-root, default the task file's folder) and must lie inside it;
only scope.* may vary per task (the model is loaded once).

Each task gets one line in --out: an answer record, or an error record {"id", "line", "error"} for
a malformed task (bad JSON, missing id or question, both or neither of context/context_file, a
missing file or one outside the context root, a bad override); a line with no usable id is named
"line:N". What depends on the run rather than the task (a prompt that does not fit this run's
memory, a model that cannot load) stops the job before any task with exit status 2, recording nothing.
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

from dist_reattn.cli import add_check_flag, check_out_file, report, run_main
from dist_reattn.config import ConfigError, add_model_args, config_for_model, parse_args_with_overrides
from dist_reattn.distributed import init_from_env, shutdown
from dist_reattn.models.load import resolve
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
    p.add_argument(
        "--context-root",
        default=None,
        help="folder every context_file must lie in (default: the --in file's folder)",
    )
    add_model_args(p)
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="default for tasks without their own (default 64)"
    )
    add_check_flag(p)
    return parse_args_with_overrides(p, argv)


def validate(args):
    """Checks every flag before anything heavy; returns (config, task file, output file, context root)."""
    tasks = Path(args.tasks)
    if not tasks.is_file():
        raise ConfigError(f"--in {args.tasks!r}: no such file")
    out = check_out_file(args.out)
    if out.resolve() == tasks.resolve():
        raise ConfigError("--out must not be the --in file")
    root = Path(args.context_root).expanduser() if args.context_root else tasks.parent
    if not root.is_dir():
        raise ConfigError(f"--context-root {args.context_root!r} is not a folder")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    cfg = config_for_model(args.model, args.config, args.overrides)
    resolve(cfg.model.path)  # a missing or broken model is found here, before any process group
    return cfg, tasks, out, root


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, tasks, out, root = validate(args)
    except ConfigError as e:
        return report(e)  # every rank validated the same flags and exits 2; rank 0 says why
    if args.check:
        return 0
    stop_on_sigterm()
    comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING, format="%(message)s")
    resume = f"re-run the same command to resume (ids already in {out} are skipped)"
    try:
        try:
            plan, prep = plan_job(tasks, out, cfg, args.max_new_tokens, comm, root)
        except ConfigError as e:
            return report(e, comm.rank)
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
    sys.exit(run_main(main))
