"""What every launch script does with bad input: one ``error:`` line on rank 0, exit status 2.

A launch script's ``main`` raises :class:`~dist_reattn.config.ConfigError` for any bad input;
:func:`run_main` turns it into that line. Under torchrun every rank validates the same flags and
exits 2 on its own, so the line is printed by rank 0 only, before any process group exists; the
ranks leave together (torchrun stops the others with SIGTERM as soon as one rank has ended, which
would turn their own exit status 2 into -15 in its failure report).
The ``check_*`` helpers test output locations before anything is loaded, and create nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

BAD_INPUT_EXIT = 2


def env_rank() -> int:
    """This process's rank from torchrun's or Slurm's variables (0 for a plain process)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report(error: Exception, rank: int | None = None) -> int:
    """Prints ``error: <message>`` on rank 0 (``rank`` defaults to the launcher's); returns 2."""
    if (env_rank() if rank is None else rank) == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    _leave_together()
    return BAD_INPUT_EXIT


def _leave_together(timeout_s: float = 10.0) -> None:
    """Under torchrun, waits (at most ``timeout_s``) until every rank is on its way out with exit 2.

    Uses torchrun's own key-value store (no process group is needed) and ignores SIGTERM meanwhile:
    the rank is already leaving, and torchrun's SIGTERM would only replace its exit status.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
        )
        key = f"dist_reattn/bad_input/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        deadline = time.monotonic() + timeout_s
        arrived = store.add(key, 1)
        while arrived < world and time.monotonic() < deadline:
            time.sleep(0.02)
            arrived = store.add(key, 0)
    except Exception:  # best effort: the exit status and the message are what matter
        pass


def add_check_flag(parser: argparse.ArgumentParser) -> None:
    """``--check``: validate every flag, the model and the input files, then exit without loading weights.

    Job scripts run it in one process before ``torchrun``: bad input then ends the job in seconds
    with one ``error:`` line and exit status 2 (under torchrun it would end as torchrun's exit 1).
    """
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the flags, the model and the input files, then exit: 0, or 2 with one error: line",
    )


def run_main(main: Callable[[], int]) -> int:
    """Runs a launch script's ``main``; a ConfigError that escapes it becomes :func:`report`.

    A rank whose process group ``main`` destroyed ends here with ``main``'s status
    (:func:`~dist_reattn.distributed.end_rank`): the interpreter's teardown after it once aborted
    finished ranks.
    """
    from .distributed import end_rank, groups_destroyed

    before = groups_destroyed()
    try:
        code = main()
    except ConfigError as e:
        code = report(e)
    if groups_destroyed() > before:
        end_rank(code)
    return code


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _can_write_in(folder: Path) -> bool:
    # A real probe, not os.access: root passes every permission check, and read-only mounts and
    # /proc refuse writes that the permission bits would allow.
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _check_parent(path: Path, flag: str, raw: str) -> None:
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise ConfigError(f"{flag} {raw!r} lies under the file {str(anchor)!r}: give a path in a folder")
    if not _can_write_in(anchor):
        raise ConfigError(
            f"{flag} {raw!r} cannot be created: {str(anchor)!r} is not writable; give a writable location"
        )


def check_out_dir(raw: str, flag: str = "--out") -> Path:
    """An output folder that can be created or written; raises ConfigError naming the fix. Creates nothing."""
    path = Path(raw).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag} {raw!r} is a file: give a folder (it is created if missing)")
        if not _can_write_in(path):
            raise ConfigError(f"{flag} {raw!r} is not writable: give a writable folder")
        return path
    _check_parent(path, flag, raw)
    return path


def check_out_file(raw: str, flag: str = "--out") -> Path:
    """An output file that can be created or appended to; raises ConfigError naming the fix. Creates nothing."""
    path = Path(raw).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {raw!r} is a directory: give a file, e.g. {str(path / 'answers.jsonl')!r}")
    if path.exists():
        try:
            with open(path, "ab"):  # appending nothing changes nothing
                pass
        except OSError as e:
            raise ConfigError(
                f"{flag} {raw!r} is not writable ({e.strerror}): give a writable file"
            ) from None
        return path
    _check_parent(path, flag, raw)
    return path


def parse_modes(raw: str, flag: str = "--mode") -> list[str]:
    """A comma list of scope modes, each known and given once; raises ConfigError naming the fix."""
    from .config import MODES

    modes = [m.strip() for m in raw.split(",")]
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"{flag} {m!r} is not one of {', '.join(MODES)}")
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        # Refused, not de-duplicated: a repeated mode is most often a typo for another one.
        raise ConfigError(f"{flag} {raw!r} names {', '.join(twice)} twice: give each mode once")
    return modes
