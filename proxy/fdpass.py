"""The only module that calls sendmsg/recvmsg with SCM_RIGHTS (and reads SO_PEERCRED).

`send()` writes a frame with its fds attached to the first byte; `recv()` does one recvmsg and
feeds bytes and fds into a takeover `Session` (whose framer owns the fds from then on and closes
those no event claimed). Sockets are non-blocking; every wait is
trio's `wait_readable` / `wait_writable`, so callers bound them with `fail_after`.
"""

from __future__ import annotations

import array
import os
import socket
import struct

import trio

from proxy.frames import MAX_FDS, ProtocolError
from proxy.takeover import Session

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_PEERCRED = struct.Struct("3i")


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


async def send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Write all of `data`, with `fds` (at most MAX_FDS) riding on its first byte. A cancel
    never lands after the frame went out: once written it counts as sent (the peer acts on it:
    an ACK, a RELEASED)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    view = memoryview(data)
    first = True
    while view or first:
        try:
            if first and fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                n = sock.sendmsg([view], anc)
            else:
                n = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        first = False
        view = view[n:]


def recv_nowait(sock: socket.socket, session: Session, size: int = 1 << 20) -> bool:
    """One recvmsg into `session` if something is there now; False when nothing was."""
    try:
        data, anc, flags, _ = sock.recvmsg(size, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return False
    _feed(session, data, anc, flags)
    return True


async def recv(sock: socket.socket, session: Session, size: int = 1 << 20) -> None:
    """One recvmsg into `session`. Raises EOFError at end of stream, ProtocolError when the
    kernel had to truncate the fds (they are closed; the peer is to be dropped)."""
    while True:
        try:
            data, anc, flags, _ = sock.recvmsg(size, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        break
    _feed(session, data, anc, flags)
    await trio.lowlevel.checkpoint()


def _feed(session: Session, data: bytes, anc: list[tuple[int, int, bytes]], flags: int) -> None:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("ancillary data truncated: too many fds in one message")
    session.receive_fds(fds)
    if data:
        session.receive_data(data)
    elif not fds:
        raise EOFError("takeover peer closed the channel")
