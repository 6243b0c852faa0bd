"""The next generation as a child process: spawned with its stderr on a pipe we read.

The child logs into that pipe (so a failure report can quote the tail of its stderr) and gets
the real stderr as an extra fd, named by $PROXY_STDERR_FD, which it switches to once it serves
(`adopt.adopt_stderr`), so its logs never depend on the old generation being alive. Whoever
spawned it kills it by pid; the pipe's read end is closed by `pump_stderr` at EOF.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import trio

STDERR_FD_ENV = "PROXY_STDERR_FD"
STDERR_TAIL_LINES = 20


async def spawn_child(argv: list[str]) -> trio.Process:
    """`sys.executable -m proxy ARGV` with the stderr arrangement above. Raises OSError."""
    real_stderr = os.dup(2)
    try:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy", *argv], stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=(real_stderr,),
            env={**os.environ, STDERR_FD_ENV: str(real_stderr)})
    finally:
        os.close(real_stderr)


async def pump_stderr(proc: trio.Process, tail: collections.deque[str]) -> None:
    """Copy the child's stderr to ours line by line, keeping `tail` for failure reports."""
    assert proc.stderr is not None
    buf = b""
    out = sys.stderr.buffer
    async with proc.stderr:
        while True:
            try:
                chunk = await proc.stderr.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                tail.append(line.decode("utf-8", "replace"))
                out.write(line + b"\n")
            out.flush()
