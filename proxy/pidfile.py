"""The pidfile (the pid of the generation serving now) and the upgrade status file beside it.

Both are replaced atomically (write a temporary file, then rename). The status file
`<pidfile>.upgrade` holds one JSON object: the last upgrade attempt's fields ("result":
"failed"|"success", "reason", "started_at", "at" (unix times), "old_pid", "new_pid", "pid" (who
wrote it)) and "attempts", the last STATUS_KEEP of them, for `proxy upgrade` to find its own.
Only the generation handling an attempt writes it, so writes do not overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import trio

STATUS_KEEP = 32


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(path: Path, pid: int | None = None) -> None:
    _replace(path, f"{pid or os.getpid()}\n")


def status_path(path: Path) -> Path:
    return path.with_name(path.name + ".upgrade")


def record_attempt(path: Path, result: str, reason: str = "", *, started_at: float,
                   old_pid: int | None = None, new_pid: int | None = None) -> None:
    """Add the outcome of an upgrade attempt to the status file beside the pidfile `path`
    (best effort). `started_at`: when the attempt began; it answers every SIGUSR2 received
    before that and after the previous attempt began, which is how `proxy upgrade` finds the
    outcome of its own signal, queued or not."""
    me = os.getpid()
    entry = {"result": result, "reason": reason, "started_at": started_at, "at": time.time(),
             "old_pid": old_pid or me, "new_pid": new_pid or me, "pid": me}
    attempts = [a for a in (read_status(path) or {}).get("attempts", []) if isinstance(a, dict)]
    attempts = [*attempts, entry][-STATUS_KEEP:]
    with contextlib.suppress(OSError):
        _replace(status_path(path), json.dumps({**entry, "attempts": attempts}) + "\n")


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def attempts_since(path: Path, t: float) -> list[dict[str, Any]]:
    """Recorded attempts that began at or after `t`, oldest first."""
    out = []
    for a in (read_status(path) or {}).get("attempts", []):
        if isinstance(a, dict) and isinstance(a.get("started_at"), int | float) and (
                a["started_at"] >= t):
            out.append(a)
    return sorted(out, key=lambda a: float(a["started_at"]))


def read(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def remove_if_mine(path: Path) -> None:
    """Remove the pidfile only when it names this process (never another generation's)."""
    if read(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (one we may not signal counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` for process `pid` to exit (a pidfd where the kernel has them);
    True when it is gone. Tells a dead peer from a live one that hung up on us."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd here: poll
        with trio.move_on_after(timeout):
            while alive(pid):
                await trio.sleep(0.01)
        return not alive(pid)
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(fd)
        return not alive(pid)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
