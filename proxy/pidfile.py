"""The pidfile: the pid of the generation serving now, replaced atomically (write, then rename)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write(path: Path, pid: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{pid or os.getpid()}\n")
    os.replace(tmp, path)


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
