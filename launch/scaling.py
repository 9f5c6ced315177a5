"""Scaling-efficiency report: strong and weak scaling of the NIAH prefill over P ranks, and a cost model.

From run directories already written by launch/niah.py (series found automatically: one length at
several P is a strong series; N = X * sqrt(P) (constant scoring work per rank) or N = X * P at several
P a weak one, its efficiency normalised by work, see dist_reattn/report/scaling.py):

    python launch/scaling.py --from runs/cpu16k-p1 runs/cpu16k-p2 runs/cpu16k-p4 runs/cpu8k-p1 runs/cpu32k-p4 \\
        --out launch/results/scaling-cpu-2026-11-24

Naming the series instead (each group of directories must be one series, or the script stops):

    python launch/scaling.py --strong runs/cpu16k-p1 runs/cpu16k-p2 runs/cpu16k-p4 \\
        --weak runs/cpu8k-p1 runs/cpu16k-p2 runs/cpu32k-p4 --out runs/scaling

Running the series first (P = 1 as ``python launch/niah.py``, P > 1 under ``python -m
torch.distributed.run --standalone --nproc_per_node P``; each (length, P) into ``OUT/runs/len<L>-p<P>``
with its ``command.txt`` and ``niah.log``; a re-run resumes, since niah.py skips recorded trials; any
other flag goes to niah.py):

    python launch/scaling.py --strong-len 16K --weak-len-per-rank 8K --ranks 1,2,4 \\
        --depths 0.1,0.5,0.9 --out runs/scaling-16k
    python launch/scaling.py --strong-len 16K --ranks 1,2,4 --dry-run --out runs/x   # print the commands

Counting the calls and bytes of every collective at P = 1..8 on a host with fewer cores (gloo; the
counts do not depend on timing, the times of such runs measure time-slicing and say nothing of
scaling; they serve as the byte reference of the cost model below):

    python launch/scaling.py --strong-len 16K --ranks 2,4,8 --oversubscribe-for-counts \\
        --model smollm2-135m --depths 0.5 --scope.slab=16 --model.dtype=bf16 --out runs/bytes

The weak series runs N(P) = X * sqrt(P) rounded to --weak-multiple tokens (8K: 8K, 11.5K, 16K at
P = 1, 2, 4), which holds the quadratic scoring work per rank constant; ``--weak-growth linear`` runs
N = X * P instead (the report normalises its efficiency by work either way).

Cost model and projection (fitted on the P in --fit-ranks, default 1,2; collectives timed from a
launch/bench_comm.py result measured in the same session; gloo runs of the same model at small N
give the bytes per collective at other P):

    python launch/scaling.py --from gpu/len1M-p1 gpu/len1M-p2 cpu/len8K-p1 cpu/len8K-p2 cpu/len8K-p4 \\
        cpu/len8K-p8 --comm-bench bench/comm-p2.json bench/comm-p4.json \\
        --project smollm2-135m=4M --project random:llama-3.1-8b=1M --project-ranks 1,2,4,8 --out rep

Read only for their counts instead (not shown as measured scaling: runs with more ranks than cores,
say), and for a model whose full shape does not fit the host, a shallower copy of it (same heads,
head dim and scope; the depth cancels in the ratio of two P):

    python launch/scaling.py --from gpu/len1M-p1 gpu/len1M-p2 --comm-bench bench/comm-p2.json \
        --bytes-reference cpu/smol-p2 cpu/smol-p4 cpu/smol-p8 random:llama-3.1-8b=cpu/llama2l-p2 \
        random:llama-3.1-8b=cpu/llama2l-p8 --project smollm2-135m=4M --out rep

Writes ``OUT/report.md`` with ``scaling.png``, ``phases.png``, ``collectives.png``, ``memory.png``.
Bad input stops with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dist_reattn.cli import check_out_dir, run_main
from dist_reattn.config import MODES, ConfigError, format_count, parse_count
from dist_reattn.report.scaling import (
    WEAK_GROWTH,
    WEAK_MULTIPLE,
    ScalingError,
    auto_series,
    explicit_series,
    load_points,
    run_commands,
    sqrt_length,
)
from dist_reattn.report.scaling_model import OPS, load_bench, load_references
from dist_reattn.report.scaling_report import write_report

NIAH = Path(__file__).resolve().parent / "niah.py"
RESERVED = ("--len", "--out", "--mode")  # set by this script for every run
# Every run is one `torchrun --standalone` on this host: no host starts more ranks than this.
MAX_RANKS = 4096


def rank_limit() -> tuple[int, str]:
    """(most ranks this host can run meaningfully, why): one GPU per NCCL rank; on CPU one core per
    rank, since more ranks than cores would measure time-slicing, not scaling."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs visible here (NCCL needs one per rank)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, "CPU cores here (more ranks than cores would measure time-slicing, not scaling)"


def check_niah_args(args, length: int, run_dir: Path) -> None:
    """Validates the flags passed on to niah.py (overrides, --model, --depths, ...) with niah.py's own
    checks, before the first run starts (and for --dry-run, instead of it)."""
    spec = importlib.util.spec_from_file_location("niah_launcher", NIAH)
    niah = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(niah)
    argv = ["--len", str(length), "--mode", args.mode, *args.niah_args, "--out", str(run_dir)]
    niah.validate(niah.parse_args(argv))


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--out", required=True, help="report directory (and, when running, OUT/runs/)")
    p.add_argument(
        "--from",
        dest="from_dirs",
        nargs="+",
        default=[],
        metavar="DIR",
        help="run directories to read; series found automatically (same length = strong, length/P = weak)",
    )
    p.add_argument(
        "--strong",
        nargs="+",
        default=[],
        metavar="DIR",
        help="run directories forming one strong series (given --strong or --weak, no series is found automatically)",
    )
    p.add_argument(
        "--weak", nargs="+", default=[], metavar="DIR", help="run directories forming one weak series"
    )
    p.add_argument("--strong-len", default=None, help="run: strong series at this length (16K, 1M, ints)")
    p.add_argument(
        "--weak-len-per-rank",
        default=None,
        help="run: weak series from this length at P=1, N(P) = X*sqrt(P) (see --weak-growth)",
    )
    p.add_argument(
        "--weak-growth",
        choices=WEAK_GROWTH,
        default="sqrt",
        help="run: sqrt (default; constant scoring work per rank) or linear (N = X*P, constant tokens per rank)",
    )
    p.add_argument(
        "--weak-multiple",
        type=int,
        default=WEAK_MULTIPLE,
        help=f"run/read: sqrt-grown lengths are rounded to a multiple of this (default {WEAK_MULTIPLE}: a chunk)",
    )
    p.add_argument(
        "--comm-bench",
        nargs="+",
        default=[],
        metavar="FILE",
        help="launch/bench_comm.py results (one per P): latency and bus bandwidth for the cost model",
    )
    p.add_argument(
        "--bytes-reference",
        nargs="+",
        default=[],
        metavar="[MODEL=]DIR",
        help="run directories read only for their calls and bytes per collective at each P (e.g. gloo "
        "runs at small N), the cost model's byte reference; MODEL=DIR: they count for MODEL (a "
        "shallower copy of its shape)",
    )
    p.add_argument(
        "--fit-ranks", default="1,2", help="the measured P the cost model is fitted on (default 1,2)"
    )
    p.add_argument(
        "--project",
        action="append",
        default=[],
        metavar="MODEL=LEN[,LEN]",
        help="project this model at these lengths (repeatable); default: each fitted configuration at its largest length",
    )
    p.add_argument(
        "--project-ranks", default="1,2,4,8", help="the P the projection table shows (default 1,2,4,8)"
    )
    p.add_argument(
        "--comm-op",
        action="append",
        default=[],
        metavar="KIND=OP",
        help="the op of a collective kind the records do not name (all_gather, all_to_all, ...)",
    )
    p.add_argument("--ranks", default="1,2,4", help="run: the P to run, comma list (default 1,2,4)")
    p.add_argument(
        "--mode", default="reattention", help="the NIAH mode run and reported (default reattention)"
    )
    p.add_argument("--dry-run", action="store_true", help="run: print the niah.py commands, run nothing")
    p.add_argument(
        "--oversubscribe-for-counts",
        action="store_true",
        help="run: allow more ranks than this host has GPUs or CPU cores; the runs then count calls and "
        "bytes per collective (which do not depend on timing) but their times measure time-slicing",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args, rest = p.parse_known_args(argv)
    args.niah_args = rest
    return args


def plan_runs(args) -> tuple[list[tuple[int, int, Path]], list[Path], list[Path]]:
    """((length, P, dir) to run, strong dirs, weak dirs) from the run-mode flags."""
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
    except ValueError as e:
        raise ConfigError(f"--ranks {args.ranks!r}: give a comma list of rank counts, e.g. 1,2,4") from e
    if any(r < 1 for r in ranks) or len(set(ranks)) < 2:
        raise ConfigError(f"--ranks {args.ranks!r}: give two or more distinct counts >= 1")
    if max(ranks) > MAX_RANKS:
        raise ConfigError(
            f"--ranks {args.ranks!r}: {max(ranks)} ranks is beyond {MAX_RANKS}, more than one host runs "
            "(each run is torchrun --standalone on this host); give counts such as 1,2,4,8"
        )
    for flag in RESERVED:
        if any(a == flag or a.startswith(flag + "=") for a in args.niah_args):
            raise ConfigError(
                f"{flag} is set by launch/scaling.py for each run; use --strong-len/--weak-len-per-rank/--out"
            )
    ranks = sorted(ranks)
    out = Path(args.out) / "runs"
    runs: dict[tuple[int, int], Path] = {}
    strong, weak = [], []
    if args.strong_len:
        n = parse_count(args.strong_len)
        for r in ranks:
            strong.append(runs.setdefault((n, r), out / f"len{format_count(n)}-p{r}"))
    if args.weak_len_per_rank:
        w = parse_count(args.weak_len_per_rank)
        for r in ranks:
            n = w * r if args.weak_growth == "linear" else sqrt_length(w, r, args.weak_multiple)
            weak.append(runs.setdefault((n, r), out / f"len{format_count(n)}-p{r}"))
    if not args.dry_run:
        limit, why = rank_limit()
        if max(ranks) > limit and not args.oversubscribe_for_counts:
            raise ConfigError(
                f"--ranks {args.ranks!r}: {max(ranks)} ranks, but {limit} {why}; give counts <= {limit}, "
                "--dry-run to print the commands for a bigger host, or --oversubscribe-for-counts for "
                "runs that only count collective calls and bytes"
            )
    planned = [(n, r, d) for (n, r), d in runs.items()]
    if planned:
        length, _, run_dir = planned[0]
        check_niah_args(args, length, run_dir)
    return planned, strong, weak


def _ranks(text: str, flag: str) -> list[int]:
    try:
        ranks = sorted({int(x) for x in text.split(",")})
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: give a comma list of rank counts, e.g. 1,2") from e
    if not ranks or ranks[0] < 1:
        raise ConfigError(f"{flag} {text!r}: rank counts are >= 1")
    return ranks


def model_options(args) -> dict:
    """The cost-model options from the flags (checked)."""
    targets: dict[str, list[int]] = {}
    for item in args.project:
        model, sep, lens = item.rpartition("=")
        if not sep or not model:
            raise ConfigError(f"--project {item!r}: give MODEL=LEN[,LEN], e.g. smollm2-135m=4M")
        targets.setdefault(model, []).extend(parse_count(x) for x in lens.split(","))
    ops = {}
    for item in args.comm_op:
        kind, sep, op = item.partition("=")
        if not sep or op not in OPS:
            raise ConfigError(f"--comm-op {item!r}: give KIND=OP with OP one of {', '.join(OPS)}")
        ops[kind] = op
    return {
        "fit_ranks": _ranks(args.fit_ranks, "--fit-ranks"),
        "project_ranks": _ranks(args.project_ranks, "--project-ranks"),
        "targets": targets,
        "benches": load_bench(args.comm_bench),
        "ops": ops,
    }


def niah_command(length: int, world: int, run_dir: Path, args) -> list[str]:
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    return [
        *launcher,
        str(NIAH),
        "--len",
        format_count(length),
        "--mode",
        args.mode,
        *args.niah_args,
        "--out",
        str(run_dir),
    ]


def run_all(runs, args) -> None:
    for length, world, run_dir in runs:
        cmd = niah_command(length, world, run_dir, args)
        print(f"P={world} len {format_count(length)}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        with open(run_dir / "niah.log", "ab") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            tail = (run_dir / "niah.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            what = (
                f"P={world} len {format_count(length)} failed (exit {rc}; {run_dir / 'niah.log'}): {tail[0]}"
            )
            # niah.py exits 2 on bad input, its one-line error last in the log: so does this script.
            raise (ConfigError if rc == 2 else RuntimeError)(what)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    running = bool(args.strong_len or args.weak_len_per_rank)
    try:
        check_out_dir(args.out)
        if args.niah_args and not running:
            raise ConfigError(
                f"unrecognized arguments: {' '.join(args.niah_args)} (niah.py flags go with --strong-len/--weak-len-per-rank)"
            )
        if args.mode not in MODES:
            raise ConfigError(f"--mode {args.mode!r}: give one of {', '.join(MODES)} (one mode per report)")
        if args.weak_multiple < 1:
            raise ConfigError(f"--weak-multiple {args.weak_multiple}: give a positive token count")
        options = model_options(args)
        runs, strong, weak = plan_runs(args) if running else ([], args.strong, args.weak)
        if not (runs or args.from_dirs or strong or weak):
            raise ConfigError(
                "nothing to report: give --from DIR..., --strong/--weak DIR..., or --strong-len/--weak-len-per-rank"
            )
        if args.dry_run:
            if not runs:
                raise ConfigError("--dry-run prints the runs of --strong-len/--weak-len-per-rank; none given")
            run_all(runs, args)
            return 0
        if runs:
            run_all(runs, args)
        dirs = list(dict.fromkeys(map(str, [*args.from_dirs, *strong, *weak])))
        points, notes = load_points(dirs, args.mode)
        options["references"], more = load_references(args.bytes_reference, args.mode)
        notes += more
        ref_dirs = [item.partition("=")[2] or item for item in args.bytes_reference]
        if strong or weak:
            series = [
                explicit_series(k, points, list(map(str, d)))
                for k, d in (("strong", strong), ("weak", weak))
                if d
            ]
        else:
            series, more = auto_series(points, args.weak_multiple)
            notes += more
    except (ConfigError, ScalingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    command = shlex.join(["python", os.path.relpath(__file__), *argv])
    try:
        cmds = run_commands([*dirs, *ref_dirs])
        path = write_report(points, series, args.out, command, dirs, [*notes, *args.note], cmds, options)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(points)} points, {len(series)} series ({', '.join(s.title for s in series) or 'none'}): {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
