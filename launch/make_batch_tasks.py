"""Writes a batch task file of NIAH haystacks (one context file per task) to try launch/batch.py on.

    python launch/make_batch_tasks.py --len 16K --n 5 --dir runs/batch16k
    python launch/batch.py --in runs/batch16k/tasks.jsonl --out runs/batch16k/answers.jsonl

Each task's context is the NIAH instruction and a haystack of about ``--len`` tokens with one needle
(depths spread over [0.1, 0.9]); ``meta.needle`` in each task (copied to its answer) is the answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_reattn.config import ConfigError, parse_count
from dist_reattn.models.load import load_tokenizer, resolve
from dist_reattn.tasks.batch import write_niah_tasks
from dist_reattn.tasks.niah import HAYSTACKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer measures the length")
    p.add_argument("--len", default="16K", help="prompt length per task: 16K, 5000, ...")
    p.add_argument("--n", type=int, default=5, help="number of tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="noise", choices=HAYSTACKS)
    p.add_argument("--dir", required=True, help="folder for tasks.jsonl and the context files")
    args = p.parse_args(argv)
    try:
        length = parse_count(args.len)
        if args.n < 1:
            raise ConfigError(f"--n {args.n} must be >= 1")
        tokenizer = load_tokenizer(resolve(args.model))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    depths = [0.5] if args.n == 1 else [round(0.1 + 0.8 * i / (args.n - 1), 3) for i in range(args.n)]
    path = write_niah_tasks(tokenizer, Path(args.dir), length, depths, args.seed, args.haystack)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
