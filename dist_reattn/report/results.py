"""Result files: one JSON object per line (JSONL), appended so that a crash never corrupts them.

Batch runners append a record per trial, possibly from several processes into one file, and may be
killed at any moment. Each record goes out as a single `os.write` to a file opened with `O_APPEND`,
so concurrent writers never interleave inside a line; a line torn by a kill is terminated by the
next append and skipped by the reader. Appenders take an flock while they check the file's last
byte; a writer killed holding it releases it with its file descriptors.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os

log = logging.getLogger(__name__)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append `record` as one JSON line, durably, with a single write.

    If the file's last byte is not a newline (a line torn by a crashed writer), a newline is written
    first, so the new record starts a line of its own.

    Args:
        path: the JSONL file; created if missing.
        record: a JSON-serializable dict.
    """
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # The lock is only for the torn-line check: a write in progress grows the file page by page,
        # so without it the check could read the middle of another writer's line. The append itself
        # is a single O_APPEND write, which the kernel never interleaves with another.
        _lock(fd)
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # one write for both, so the record stays whole
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the lock


def _lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a file system without locks: appends stay whole, the check is best-effort
        log.debug("no flock on result file (%s); appending without it", e)


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL result file, skipping blank lines and lines that do not parse.

    A torn last line (from a writer killed mid-append) is expected and logged as a warning; an
    unparseable line elsewhere is logged as an error and skipped.

    Args:
        path: the JSONL file.

    Returns:
        The records in file order; [] if the file does not exist.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            level = logging.WARNING if i == last else logging.ERROR
            log.log(level, "%s: skipping unparseable line %d (%s): %.80r", path, i + 1, e, line)
            continue
        records.append(record)
    return records
