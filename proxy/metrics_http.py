"""The `[metrics] listen` endpoint: GET/HEAD /metrics over HTTP/1.1 with h11, on trio.

Requests are bounded in size (`MAX_REQUEST`) and time (`REQUEST_TIMEOUT`); anything but
/metrics is 404, other methods 405. The connection's socket is owned (and closed) here.

A connection's first request (accept to answer) and any request being answered count as work
the generation holds (`busy`); a scraper's idle keep-alive connection does not keep an old
generation alive: it is closed when that generation exits, and the scraper reconnects to the
listening socket, which the next generation holds.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager

import trio

from proxy.h11impl import h11
from proxy.metrics import CONTENT_TYPE

MAX_REQUEST = 16384
REQUEST_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONN = 100


Busy = Callable[[], AbstractContextManager[None]]
Render = Callable[[], Awaitable[bytes]]  # the exposition (a supervisor first asks its workers)


async def serve_conn(render: Render, busy: Busy, sock: socket.socket) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT * MAX_REQUESTS_PER_CONN):
            # A new connection's first request is surely coming: it holds the generation from
            # accept to answer (else an old generation could exit between the two and reset
            # it). Later requests on a kept-alive connection hold it only while answered.
            with busy():
                more = await _one(render, busy, stream, conn)
            for _ in range(MAX_REQUESTS_PER_CONN - 1):
                if not more:
                    break
                more = await _one(render, busy, stream, conn)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass
    finally:
        await stream.aclose()


async def _one(render: Render, busy: Busy, stream: trio.SocketStream,
               conn: h11.Connection) -> bool:
    """Serve one request; False when the connection is to be closed."""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _send(stream, conn, exc.error_status_hint, b"bad request\n")
                return False
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request) or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                return False
    if not isinstance(event, h11.Request):
        return False
    path = event.target.split(b"?", 1)[0]
    with busy():
        if event.method not in (b"GET", b"HEAD"):
            await _send(stream, conn, 405, b"method not allowed\n")
        elif path != b"/metrics":
            await _send(stream, conn, 404, b"not found: try /metrics\n")
        else:
            body = await render()
            await _send(stream, conn, 200, body, CONTENT_TYPE, head=event.method == b"HEAD")
    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
        return False
    # Drain the rest of the request (a body on a GET is legal), then start over.
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        return False
    conn.start_next_cycle()
    return True


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes,
                ctype: str = "text/plain; charset=utf-8", head: bool = False) -> None:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if not head:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
