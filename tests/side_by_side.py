"""Independent commands run side by side, for tests that compare a one-process run with a multi-rank one.

A single-threaded reference run and a two-rank run share a 2-core CI machine: started together they
finish in about the time of the longer one instead of the sum of both (the README example: 175 s
instead of 243 s, measured on 2 cores). Each command's output goes to a file, never a pipe, so that a
run that writes much (progress bars) cannot stall on a full pipe while the other is waited for.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time


def run_side_by_side(
    commands: list[list[str]], timeout: float | None = None, **popen
) -> list[subprocess.CompletedProcess]:
    """Starts every command at once and waits for all of them.

    Args:
        commands: the argument lists, each run as by ``subprocess.run``.
        timeout: seconds each command may take, counted from the common start; on expiry every
            command still running is killed and ``subprocess.TimeoutExpired`` is raised.
        popen: passed to every ``subprocess.Popen`` (``cwd``, ``env``).

    Returns:
        One ``CompletedProcess`` (return code, text stdout and stderr) per command, in order.
    """
    with contextlib.ExitStack() as stack:
        files = [
            (
                stack.enter_context(tempfile.TemporaryFile("w+")),
                stack.enter_context(tempfile.TemporaryFile("w+")),
            )
            for _ in commands
        ]
        procs = []
        try:
            t0 = time.monotonic()
            for cmd, (out, err) in zip(commands, files, strict=True):
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen))
            for cmd, proc in zip(commands, procs, strict=True):
                left = None if timeout is None else max(timeout - (time.monotonic() - t0), 0)
                try:
                    proc.wait(left)
                except subprocess.TimeoutExpired:
                    raise subprocess.TimeoutExpired(cmd, timeout) from None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        done = []
        for cmd, proc, (out, err) in zip(commands, procs, files, strict=True):
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
        return done
