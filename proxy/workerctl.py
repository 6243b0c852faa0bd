"""The control line between a supervisor and each of its workers, sans-IO: typed messages, their
wire form (one JSON object per line) and a strict decoder. No trio and no sockets here.

    supervisor -> worker                      worker -> supervisor
    POLL {seq}      heartbeat + metrics       REPORT {seq, metrics, active}   the answer
    SERVE           the generation serves:    READY        listeners open; every peer session
                    start accepting (also the              said READY (a new worker)
                    answer to SUCCESSOR_LOST:
                    serve on)
    RELEASE         an old worker may send    PEER_READY   an old worker's successor said READY:
                    RELEASED to its successor              it waits for RELEASE or ABORT
    ABORT {reason}  the generation's upgrade  RELEASED     an old worker sent RELEASED
                    rolled back (also: no,    SERVING      a new worker serves (every peer
                    do not serve on)                       released it, metrics restored)
                                              FAILED {reason}  a new worker gives up (it exits)
                                              SUCCESSOR_LOST  an old worker's successor died
                                                           after RELEASED: serve on?

Why a line of JSON and not the takeover framing: no fds ever travel here (connections go worker
to worker on the takeover channel), and every message is small except REPORT, which is bounded.
A supervisor stops a worker with SIGTERM (graceful) or SIGKILL, not with a message, so a hung
worker can still be stopped. EOF means the other side is gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 4 * 1024 * 1024  # a REPORT carries a metrics snapshot; anything longer is garbage
MAX_REASON = 500


class ControlError(Exception):
    """The peer sent something that is not a control message: the line is unusable."""


@dataclass(frozen=True)
class Poll:
    seq: int


@dataclass(frozen=True)
class Serve:
    pass


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Report:
    seq: int
    metrics: dict[str, list[Any]]  # Metrics.snapshot(): validated by Metrics.restore()
    active: dict[str, float]  # proxy_connections_active by listener
    process: dict[str, float]  # the worker's process_* samples (prometheus-client's collector)


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class PeerReady:
    pass


@dataclass(frozen=True)
class Released:
    metrics: dict[str, list[Any]]  # the counters our RELEASED's base held (see supervisor.py)


@dataclass(frozen=True)
class Serving:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class SuccessorLost:
    pass


Message = (Poll | Serve | Release | Abort | Report | Ready | PeerReady | Released | Serving | Failed
           | SuccessorLost)
_TYPES: dict[str, type[Message]] = {
    "poll": Poll, "serve": Serve, "release": Release, "abort": Abort, "report": Report,
    "ready": Ready, "peer_ready": PeerReady, "released": Released, "serving": Serving,
    "failed": Failed, "successor_lost": SuccessorLost}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(msg: Message) -> bytes:
    body: dict[str, Any] = {"type": _NAMES[type(msg)]}
    if isinstance(msg, Poll):
        body["seq"] = msg.seq
    elif isinstance(msg, Report):
        body.update(seq=msg.seq, metrics=msg.metrics, active=msg.active, process=msg.process)
    elif isinstance(msg, Released):
        body["metrics"] = msg.metrics
    elif isinstance(msg, Abort | Failed):
        body["reason"] = msg.reason[:MAX_REASON]
    line = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ValueError("control message too long")
    return line


def _seq(body: dict[str, Any]) -> int:
    seq = body.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**53:
        raise ControlError("bad seq")
    return seq


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ControlError("bad reason")
    return reason


def _numbers(d: object) -> dict[str, float]:
    if not isinstance(d, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int | float)
            for k, v in d.items()):
        raise ControlError("bad report")
    return {k: float(v) for k, v in d.items()}


def decode(line: bytes) -> Message:
    """One line (without its newline) -> a message. Raises ControlError."""
    try:
        body = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError("not an object")
    cls = _TYPES.get(body.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ControlError(f"unknown type {str(body.get('type'))[:40]!r}")
    if cls is Poll:
        return Poll(_seq(body))
    if cls is Report:
        metrics = body.get("metrics")
        if not isinstance(metrics, dict):
            raise ControlError("bad report")
        return Report(_seq(body), metrics, _numbers(body.get("active")),
                      _numbers(body.get("process")))
    if cls is Released:
        metrics = body.get("metrics")
        if not isinstance(metrics, dict):
            raise ControlError("bad released")
        return Released(metrics)
    if cls is Abort:
        return Abort(_reason(body))
    if cls is Failed:
        return Failed(_reason(body))
    return cls()  # type: ignore[call-arg]


class LineDecoder:
    """Bytes in, messages out; a line longer than MAX_LINE is a ControlError."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    raise ControlError("control line too long")
                return out
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            out.append(decode(line))
