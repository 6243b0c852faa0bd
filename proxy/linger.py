"""Lingering close (nginx's `lingering_close`): how a connection ends after an early error answer.

Why: closing a TCP socket that still has unread input makes the kernel answer with a reset, not
a FIN (RFC 1122 4.2.2.13; Linux `tcp_close`, "data_was_unread"), and keeps resetting whatever
the client sends after it. An error answered before the request was read whole (400, 408, 431,
502, 503, 504) is exactly that case: a client that writes its whole request before it reads (as
Python's http.client does) is still in `send()` when the reset comes, gets EPIPE or ECONNRESET
and never reaches the read that would have found our status line. Measured with both cores busy
before this module, to a listener whose upstream is down: 0 of 100 10 MiB POSTs (http.client)
read their 502, 91 to 98 of 100 1 MiB heads written in 64 KiB pieces their 431.

What we do instead, as nginx does: send the response, shut down our writing side (the client
sees the response and then EOF), read and discard what the client still sends, and close only
once it stopped: at its EOF, after `lingering_timeout` with nothing read, after `lingering_time`
in all, or after `LINGER_MAX_BYTES` discarded, whichever comes first. Past a bound the close
may still reset: that client kept sending long after its answer.

The byte cap is ours (nginx has none): discarding costs a syscall per 64 KiB, and over loopback
or a LAN a client can push gigabytes within `lingering_time`, so without it one error could buy a
client seconds of our CPU (and a few such clients a generation's drain). 64 MiB covers the
requests a client plausibly writes whole before reading, at well under a second of CPU; a bigger
upload that meets an error is cut as it was before lingering. Discarded bytes are not counted in
`proxy_bytes_total` (they go nowhere).

`wanted` decides (no I/O besides a peek); `linger_close` is the part that awaits.
"""

from __future__ import annotations

import socket

import trio

from proxy import log
from proxy.config import Listener

LINGER_MAX_BYTES = 64 << 20
_DISCARD = bytearray(65536)  # shared: every read into it is synchronous and its bytes unused


def wanted(mode: str, sock: socket.socket, *, request_read: bool, eof: bool) -> bool:
    """Whether to linger after an error answer, by nginx's rule for `lingering_close`: "off"
    never; "always" unless the client has ended its side already (`eof`); "on" when more input
    may come: the request was not read whole, or bytes past it wait in the socket."""
    if mode == "off" or eof:
        return False
    return mode == "always" or not request_read or _input_waiting(sock)


def _input_waiting(sock: socket.socket) -> bool:
    """Bytes from the peer wait to be read right now (an EOF or an error does not count)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError (nothing yet) or the peer reset
        return False


async def linger_close(sock: socket.socket, lst: Listener, *,
                       max_bytes: int = LINGER_MAX_BYTES) -> str:
    """Half-close `sock` (its response already sent), read and discard the client's input
    until it stops, then close it. Returns why it stopped: `eof`, `timeout` (nothing read for
    `lst.lingering_timeout`), `time` (`lst.lingering_time` in all), `bytes` (`max_bytes`
    discarded) or `error` (the client reset). Always closes `sock`, also when cancelled (a
    generation torn down past its drain: what is still unread then turns into a reset)."""
    why = "eof"
    discarded = 0
    t0 = trio.current_time()
    end = t0 + lst.lingering_time
    try:
        sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                n = sock.recv_into(_DISCARD)
            except BlockingIOError:
                now = trio.current_time()
                with trio.move_on_at(min(end, now + lst.lingering_timeout)) as wait:
                    await trio.lowlevel.wait_readable(sock)
                if wait.cancelled_caught:
                    why = "time" if trio.current_time() >= end else "timeout"
                    break
                continue
            if n == 0:
                break
            discarded += n
            if discarded >= max_bytes:
                why = "bytes"
                break
            if trio.current_time() >= end:  # a client that never pauses never blocks us here
                why = "time"
                break
            await trio.lowlevel.checkpoint()  # one read per turn: the others get theirs
    except OSError:
        why = "error"
    finally:
        sock.close()
    # eof and error are how clients end (a reset: it closed with our answer's tail unread).
    (log.debug if why in ("eof", "error") else log.info)(
        "lingered", listener=lst.name, reason=why, bytes=discarded,
        ms=round((trio.current_time() - t0) * 1000, 1))
    return why
