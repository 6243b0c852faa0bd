"""One HTTP message body moved raw from one socket to another, framed by a `BodyFramer`.

Once h11 has parsed a head and the body's framing is the same on both sides (Content-Length,
or chunked to an HTTP/1.1 peer), the body's wire bytes need no re-framing: they are forwarded
as they arrived, and a `BodyFramer` (framing.py) says where the body ends and whether its
framing is valid. That saves h11's per-chunk parse and re-serialisation, and it makes the body
movable: the whole state is the framer's snapshot plus two byte buffers.

Pause-safety (as forward.py's relay): the only awaits are `wait_readable` / `wait_writable`, and
the state (`pending`, `after`, the framer) is updated synchronously right after each recv/send,
so cancelling at any await leaves a state that describes every byte: `pending` holds what was
read of this body and not written yet, `after` what was read past the body's end (the next
message on that connection). Calling `pump_body` again with the same objects carries on.

Fds: this module owns none; the caller's sockets stay the caller's.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable

import trio

from proxy.framing import BodyFramer, FramingError

RECV_SIZE = 65536


class PeerClosed(Exception):
    """The source closed (or reset) before its body was complete."""


async def flush(sock: socket.socket, buf: bytearray, count: Callable[[int], None]) -> None:
    """Write all of `buf` to `sock`, removing what was written as it goes (pause-safe)."""
    while buf:
        try:
            n = sock.send(buf)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        del buf[:n]
        count(n)


async def pump_body(src: socket.socket, dst: socket.socket, framer: BodyFramer,
                    pending: bytearray, after: bytearray, count: Callable[[int], None],
                    idle_timeout: float = 0.0, rechunk: bool = False) -> None:
    """Move the rest of one body from `src` to `dst`. Returns when the framer says it ended and
    every byte of it was written. Raises FramingError (malformed framing: what came before the
    bad byte was forwarded), PeerClosed, trio.TooSlowError (nothing from `src` for
    `idle_timeout`, 0 = no limit) or OSError from either socket.

    `rechunk`: an until-EOF body (the upstream closes to end it) goes to an HTTP/1.1 client
    that was told `Transfer-Encoding: chunked`: each read becomes one chunk, EOF the last."""
    while True:
        if pending:
            await flush(dst, pending, count)
        if framer.done:
            return
        with trio.fail_after(idle_timeout or math.inf):
            await trio.lowlevel.wait_readable(src)
        try:
            data = src.recv(RECV_SIZE)
        except BlockingIOError:
            continue
        except ConnectionResetError as exc:
            raise PeerClosed("reset mid-body") from exc
        if not data:
            try:
                framer.eof()
            except FramingError as exc:
                raise PeerClosed(str(exc)) from exc
            if rechunk:
                pending += b"0\r\n\r\n"
            continue  # flush what is pending, then done
        n, _ = framer.feed(data)
        if n == len(data):  # the common case: the whole read is body (no slice copy)
            pending += b"%x\r\n%s\r\n" % (n, data) if rechunk else data
            continue
        pending += data[:n]  # (an until-EOF body, the one rechunked, never ends mid-read)
        after += data[n:]
