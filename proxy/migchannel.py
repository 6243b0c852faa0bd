"""The host-migration channel's trio adapter: one TCP socket, a `migwire.Wire` (authentication
and authenticated frames) and a takeover `Session` (with no fds: TCP_REPAIR dumps travel beside
each CONNS message instead).

Every wait is bounded (AUTH_TIMEOUT for the handshake, STEP_TIMEOUT otherwise, or the caller's),
and whatever can go wrong on the socket or in the peer's bytes is translated once, here, into
`MigrationError` (`PeerAborted` for the peer's ABORT), keeping the cause.

Fd ownership: the channel owns its socket; `close()` closes it.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import trio

from proxy import repair
from proxy.frames import ProtocolError
from proxy.migwire import (
    KIND_REPORT,
    KIND_SESSION,
    Payload,
    Wire,
    WireError,
    parse_payload,
    report_payload,
    session_payload,
)
from proxy.takeover import Abort, Conns, Event, Session

AUTH_TIMEOUT = 5.0  # the handshake; a peer that says nothing is dropped
STEP_TIMEOUT = 10.0  # any other wait for the peer
# A's bounds before the freeze, which B waits out for RELEASED (migrate.py, step 3):
MOVABLE_WAIT = 10.0  # every connection movable (or drain_timeout when shorter)
POOL_CLOSE_WAIT = 1.0  # closing idle upstream connections: the bound on their FIN exchange


class MigrationError(Exception):
    """A migration failed; str() is the reason reported (everything is still served where it
    was)."""


class PeerAborted(MigrationError):
    pass


class MigChannel:
    """One authenticated migration channel: a TCP socket, a `Wire` and a `Session`."""

    def __init__(self, sock: socket.socket, wire: Wire, session: Session) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.wire = wire
        self.session = session

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[n:]

    async def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            break
        if not data:
            raise EOFError("the migration peer closed the channel")
        self.wire.receive_data(data)

    async def handshake(self) -> None:
        """Authenticate both ways (bounded by AUTH_TIMEOUT). Raises MigrationError."""
        try:
            with trio.fail_after(AUTH_TIMEOUT):
                await self._write(self.wire.output())
                while not self.wire.authenticated:
                    await self._read()
                    await self._write(self.wire.output())
        except (WireError, EOFError, OSError, trio.TooSlowError) as exc:
            raise MigrationError(f"authentication failed: {describe(exc)}") from exc

    async def send(self, event: Event, dumps: list[repair.SocketDump] | None = None) -> None:
        try:
            frame = self.session.send(event)
            data = self.wire.seal(session_payload(frame, dumps or []))
            with trio.fail_after(STEP_TIMEOUT):
                await self._write(data)
        except (WireError, ProtocolError, OSError, trio.TooSlowError) as exc:
            raise MigrationError(describe(exc)) from exc

    async def send_report(self, report: dict[str, Any]) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            await self._write(self.wire.seal(report_payload(report)))

    async def _payload(self, timeout: float) -> Payload:
        with trio.fail_after(timeout):
            while (raw := self.wire.next_payload()) is None:
                await self._read()
        return parse_payload(raw)

    async def receive(self, timeout: float = STEP_TIMEOUT
                      ) -> tuple[Event, tuple[repair.SocketDump, ...]]:
        """The next session event with the dumps it carries. Raises MigrationError
        (PeerAborted for an ABORT)."""
        try:
            p = await self._payload(timeout)
            if p.kind != KIND_SESSION:
                raise WireError("a report where a session message was expected")
            self.session.receive_data(p.session)
            got = self.session.next_event()
            if got is None or self.session.next_event() is not None:
                raise WireError("a frame must carry exactly one session message")
        except (WireError, ProtocolError, EOFError, OSError, trio.TooSlowError) as exc:
            raise MigrationError(describe(exc)) from exc
        event, fds = got
        fds.close()
        if isinstance(event, Abort):
            raise PeerAborted(f"the peer aborted: {event.reason[:200]}")
        if p.dumps and not isinstance(event, Conns):
            raise MigrationError("socket dumps outside a CONNS message")
        return event, p.dumps

    async def receive_report(self, timeout: float) -> dict[str, Any]:
        try:
            p = await self._payload(timeout)
        except (WireError, EOFError, OSError, trio.TooSlowError) as exc:
            raise MigrationError(describe(exc)) from exc
        if p.kind != KIND_REPORT or p.report is None:
            raise MigrationError("expected the peer's report")
        return p.report

    async def abort(self, reason: str) -> None:
        with contextlib.suppress(MigrationError, ProtocolError, WireError, OSError,
                                 trio.TooSlowError), trio.move_on_after(1.0):
            if self.wire.authenticated:
                await self.send(Abort(reason, serving=True))

    def close(self) -> None:
        self.session.close()
        self.sock.close()


def describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "the migration peer did not answer in time"
    if isinstance(exc, EOFError):
        return "the migration peer closed the channel"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


