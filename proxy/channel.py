"""The takeover channel's trio adapter, shared by both generations: a Unix socket plus a
`takeover.Session`.

`bind_channel()` listens (mode 0600); `connect_channel()` is the new side's way in; both check
the peer with SO_PEERCRED (same uid, or root). `Channel.send()` / `receive()` bound every wait
with a timeout and translate what can go wrong on the socket into `ChannelError`, keeping the
cause; a peer's ABORT arrives as `PeerAborted`.

Fd ownership: fds we send stay ours (SCM_RIGHTS gives the peer copies). Fds we receive are
owned by the session's framer, then by the `OwnedFds` returned with their event, until a
consumer claims them; `close()` closes the socket and every received fd nobody claimed.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import trio

from proxy import fdpass
from proxy.takeover import Abort, Event, OwnedFds, ProtocolError, Session


class ChannelError(Exception):
    """The session cannot go on: the peer broke the protocol, hung up, timed out or aborted."""


class PeerAborted(ChannelError):
    """The peer sent ABORT; the message is its reason, `serving` whether it serves after it."""

    def __init__(self, message: str, serving: bool, reason: str = "") -> None:
        super().__init__(message)
        self.serving = serving
        self.reason = reason  # the peer's own words


class PeerRefused(ChannelError):
    """The peer on the other end runs as another uid (and is not root)."""


def peer_allowed(sock: socket.socket) -> tuple[bool, int, int]:
    pid, uid, _ = fdpass.peer_cred(sock)
    return uid == os.getuid() or uid == 0, pid, uid


def bind_channel(path: Path) -> socket.socket:
    """Listen on the takeover socket (mode 0600). A stale socket file is replaced; a live one
    means a generation already serves there: OSError."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        raise OSError(f"a generation already serves on {path} (use --takeover to replace it)")
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


def connect_channel(path: Path) -> socket.socket:
    """The new side's connection to the serving generation. Raises ChannelError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        ok, pid, uid = peer_allowed(sock)
    except OSError as exc:
        sock.close()
        raise ChannelError(f"nothing serves on the takeover channel {path}: "
                           f"{exc.strerror or exc}") from exc
    if not ok:
        sock.close()
        raise PeerRefused(f"takeover peer pid {pid} runs as uid {uid}")
    return sock


# What a broken session looks like from the socket's side: translated once, here.
_ERRORS = (ProtocolError, EOFError, OSError, trio.TooSlowError)


class Channel:
    """A connected takeover channel: one session, one socket."""

    def __init__(self, sock: socket.socket, session: Session, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.session = session
        self.timeout = timeout

    async def send(self, event: Event, fds: Sequence[int] = ()) -> None:
        try:
            data = self.session.send(event, fds)
            with trio.fail_after(self.timeout):
                await fdpass.send(self.sock, data, list(fds))
        except _ERRORS as exc:
            raise ChannelError(_describe(exc)) from exc

    async def receive(self, timeout: float | None = None) -> tuple[Event, OwnedFds]:
        """The next event with the fds it carries (the caller owns those: claim or close)."""
        try:
            try:
                with trio.fail_after(self.timeout if timeout is None else timeout):
                    while True:
                        got = self.session.next_event()
                        if got is not None:
                            break
                        await fdpass.recv(self.sock, self.session)
            except trio.TooSlowError:
                # A process that was stopped (SIGSTOP, a long GC, a busy machine) wakes up past
                # its deadline with the answer already waiting: read what is there first.
                got = self.ready_now()
                if got is None:
                    raise
        except _ERRORS as exc:
            raise ChannelError(_describe(exc)) from exc
        event, fds = got
        if isinstance(event, Abort):
            fds.close()
            raise PeerAborted(f"peer aborted: {event.reason[:200]}", event.serving, event.reason)
        return event, fds

    def ready_now(self) -> tuple[Event, OwnedFds] | None:
        """The next event if its bytes are already here (never waits). Raises ChannelError."""
        try:
            while (got := self.session.next_event()) is None:
                if not fdpass.recv_nowait(self.sock, self.session):
                    return None
        except _ERRORS as exc:
            raise ChannelError(_describe(exc)) from exc
        return got

    async def abort(self, reason: str, serving: bool) -> None:
        """Tell the peer we give up, and whether we serve afterwards (best effort: the channel
        may already be broken)."""
        with contextlib.suppress(ChannelError, ProtocolError):
            await self.send(Abort(reason, serving))

    def close(self) -> None:
        self.session.close()
        self.sock.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "takeover peer did not answer in time"
    if isinstance(exc, EOFError):
        return "takeover peer closed the channel"
    return f"{type(exc).__name__}: {exc}"
