"""Writes a batch task file of NIAH haystacks (one context file per task) to try launch/batch.py on.

    python launch/make_batch_tasks.py --len 16K --n 5 --dir runs/batch16k
    python launch/batch.py --in runs/batch16k/tasks.jsonl --out runs/batch16k/answers.jsonl
    python launch/make_batch_tasks.py --task ruler --tasks niah,vt --len 16K --n 3 --dir runs/ruler16k
    python -m dist_reattn.report.ruler_report runs/ruler16k/answers.jsonl   # after batch.py: RULER scores

Each task's context is the NIAH instruction and a haystack of about ``--len`` tokens with one needle
(depths spread over [0.1, 0.9]); ``meta.needle`` in each task (copied to its answer) is the answer.
With ``--task ruler``, ``--n`` RULER samples per task of ``--tasks`` (see launch/ruler.py), each with
its answers, metric and RULER's tokens to generate; ``dist_reattn.report.ruler_report`` scores them.
"""

from __future__ import annotations

import argparse
import shutil
import sys

import torch

from dist_reattn.cli import check_out_dir, run_main
from dist_reattn.config import ConfigError, parse_count
from dist_reattn.models.load import load_tokenizer, resolve
from dist_reattn.plan import available_bytes, gib
from dist_reattn.tasks.batch import write_niah_tasks, write_ruler_tasks
from dist_reattn.tasks.niah import HAYSTACKS, min_length

# Measured (SmolLM2 tokenizer, noise haystack, 4M and 32M tokens): building one task peaks at
# 46-76 bytes of memory per token (token lists, then the decoded text); its file is 3.75 bytes per token.
BUILD_BYTES_PER_TOKEN = 80
FILE_BYTES_PER_TOKEN = 4


def check_size(length: int, n: int, folder) -> None:
    """Refuses, with the numbers, a job whose haystack cannot be built in memory or written to disk."""
    need, have = length * BUILD_BYTES_PER_TOKEN, available_bytes(torch.device("cpu"))
    if need > have:
        raise ConfigError(
            f"--len {length} needs about {gib(need)} of memory to build one haystack "
            f"({BUILD_BYTES_PER_TOKEN} bytes/token), {gib(have)} is available: "
            f"use --len {have // BUILD_BYTES_PER_TOKEN // 2**20}M or less"
        )
    anchor = folder
    while not anchor.exists():
        anchor = anchor.parent
    need, have = n * length * FILE_BYTES_PER_TOKEN, shutil.disk_usage(anchor).free
    if need > have:
        raise ConfigError(
            f"{n} tasks of --len {length} need about {gib(need)} of disk in {str(folder)!r} "
            f"({FILE_BYTES_PER_TOKEN} bytes/token), {gib(have)} is free: lower --n or --len, or use another --dir"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer measures the length")
    p.add_argument("--len", default="16K", help="prompt length per task: 16K, 5000, ...")
    p.add_argument("--n", type=int, default=5, help="number of tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="noise", choices=HAYSTACKS)
    p.add_argument("--dir", required=True, help="folder for tasks.jsonl and the context files")
    p.add_argument(
        "--task", default="niah", choices=("niah", "ruler"), help="NIAH haystacks or RULER samples"
    )
    p.add_argument("--tasks", default="niah,vt", help="with --task ruler: RULER task names, niah or all")
    args = p.parse_args(argv)
    length = parse_count(args.len)
    if args.n < 1:
        raise ConfigError(f"--n {args.n} must be >= 1")
    folder = check_out_dir(args.dir, "--dir")
    check_size(length, args.n, folder)
    tokenizer = load_tokenizer(resolve(args.model))
    if args.task == "ruler":
        from dist_reattn.tasks.ruler import min_length as ruler_min_length
        from dist_reattn.tasks.ruler import parse_tasks

        tasks = parse_tasks(args.tasks)
        for task in tasks:
            if length < ruler_min_length(tokenizer, task, length):
                raise ConfigError(
                    f"--len {length} is too short for RULER {task}: use >= {ruler_min_length(tokenizer, task, length)}"
                )
        print(write_ruler_tasks(tokenizer, folder, length, tasks, args.n, args.seed))
        return 0
    shortest = min_length(tokenizer, args.haystack)
    if length < shortest:
        raise ConfigError(f"--len {length} is too short to hold the needle and question: use >= {shortest}")
    depths = [0.5] if args.n == 1 else [round(0.1 + 0.8 * i / (args.n - 1), 3) for i in range(args.n)]
    path = write_niah_tasks(tokenizer, folder, length, depths, args.seed, args.haystack)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
