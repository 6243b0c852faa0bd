"""What a connection handler offers so it can move to another generation, and the plain data it
moves with.

No trio and no I/O here: the takeover codec (`takeover.py`) imports these types, and importing
the codec must not import trio. `Relay` (forward.py) and `HttpClient` (http.py) implement
`Movable`; the `Server` drives them through it, and the upgrader sees only records and ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from proxy.framing import FramingSnapshot


class State(Enum):
    NEW = "new"
    RUNNING = "running"
    PAUSED = "paused"
    CLOSED = "closed"
    TUNNEL = "tunnel"  # an http client connection that became a tcp relay


@dataclass(frozen=True)
class DirectionSnapshot:
    pending: bytes = b""  # read from the source, not yet written to the destination
    eof: bool = False  # the source reached EOF
    shut: bool = False  # shutdown(SHUT_WR) was done on the destination


@dataclass(frozen=True)
class PairSnapshot:
    """Everything a handler needs, besides its fds, to carry on in another process."""

    c2u: DirectionSnapshot = DirectionSnapshot()
    u2c: DirectionSnapshot = DirectionSnapshot()


class Movable(Protocol):
    """A connection handler that can stop at a safe point and carry on elsewhere.

    Contract: `run()` serves until the connection closes (CLOSED), pauses (PAUSED) or, for
    http, becomes a tunnel (TUNNEL). `request_pause()` asks it to stop without waiting, so a
    whole batch stops in one scheduler pass; `pause()` waits for the stop and returns the
    snapshot, or None when the connection finished meanwhile (its fds are then closed). While
    paused the handler still owns its fds (`fds()`, for SCM_RIGHTS copies) until `close()`, or
    `run()` resumes it.
    """

    async def run(self) -> State: ...

    def movable(self) -> bool: ...

    def request_pause(self) -> None: ...

    async def pause(self) -> PairSnapshot | None: ...

    def fds(self) -> tuple[int, ...]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ExchangeState:
    """An http request/response in flight on the raw body path (http.RawExchange), as plain
    data: with the client and upstream sockets it carries on in another process byte-exact.
    Bytes read and not yet written travel in the PairSnapshot beside it (c2u: request body
    bytes for the upstream; u2c: response bytes for the client, or in "response_head" the
    upstream's bytes h11 had not parsed yet)."""

    phase: str  # "request_body" | "response_head" | "response_body"
    method: bytes
    target: bytes
    version: bytes  # the client's HTTP version
    headers: tuple[tuple[bytes, bytes], ...]  # the client's request head, as h11 parsed it
    up_headers: tuple[tuple[bytes, bytes], ...]  # the request head as sent upstream
    request: FramingSnapshot
    response: FramingSnapshot | None  # in "response_body"
    status: int
    client_keep: bool
    resp_keep: bool
    server: str  # the upstream server's address
    elapsed: float  # seconds since the request head arrived
    after: bytes = b""  # client bytes past the request body (the next requests)
    up_after: bytes = b""  # upstream bytes past the response body
    rechunk: bool = False  # an until-EOF response body re-framed as chunks for the client
