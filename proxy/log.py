"""Logging: one line per event, `key=value` fields, generation and pid on every line.

    2026-11-22T07:40:01.123Z level=info event=listening gen=1 pid=4242 listener=web addr=127.0.0.1:8080

Tests and operators grep these lines (`event=...`), so event names are part of the README.
Everything goes to stderr; stdout is the CLI's own output.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

_state = {"generation": 1, "worker": -1}  # worker -1: not a worker process (no field)
_logger = logging.getLogger("proxy")


def _quote(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ms = int(record.msecs)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z"
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [ts, f"level={record.levelname.lower()}", f"event={record.getMessage()}",
                 f"gen={_state['generation']}", f"pid={os.getpid()}"]
        if _state["worker"] >= 0:
            parts.append(f"worker={_state['worker']}")
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        return " ".join(parts)


def setup(level: str = "info", generation: int = 1) -> None:
    """Route the proxy's logs to stderr, one line each. Safe to call again (level changes)."""
    _state["generation"] = generation
    _logger.setLevel(level.upper())
    _logger.propagate = False
    if not _logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        _logger.addHandler(handler)


def set_generation(generation: int) -> None:
    _state["generation"] = generation


def set_worker(index: int) -> None:
    """Every line from here on carries `worker=K` (after pid)."""
    _state["worker"] = index


def _log(level: int, event: str, fields: dict[str, Any]) -> None:
    if _logger.isEnabledFor(level):
        _logger.log(level, event, extra={"fields": fields})


def debug(event: str, **fields: Any) -> None:
    _log(logging.DEBUG, event, fields)


def info(event: str, **fields: Any) -> None:
    _log(logging.INFO, event, fields)


def warning(event: str, **fields: Any) -> None:
    _log(logging.WARNING, event, fields)


def error(event: str, **fields: Any) -> None:
    _log(logging.ERROR, event, fields)
