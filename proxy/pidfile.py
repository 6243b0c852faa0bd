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
