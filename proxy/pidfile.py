"""The pidfile (the pid of the generation serving now) and the upgrade status file beside it.

Both are replaced atomically (write a temporary file, then rename). The status file
`<pidfile>.upgrade` holds one JSON object about the last upgrade attempt, for
`proxy upgrade` to report: {"result": "failed"|"success", "reason", "pid", "at" (unix time)}.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(path: Path, pid: int | None = None) -> None:
    _replace(path, f"{pid or os.getpid()}\n")


def status_path(path: Path) -> Path:
    return path.with_name(path.name + ".upgrade")


def write_status(path: Path, result: str, reason: str = "") -> None:
    """Record the outcome of an upgrade attempt beside the pidfile `path` (best effort)."""
    with contextlib.suppress(OSError):
        _replace(status_path(path), json.dumps(
            {"result": result, "reason": reason, "pid": os.getpid(), "at": time.time()}) + "\n")


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
