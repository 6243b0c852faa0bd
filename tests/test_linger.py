"""linger.py on a socketpair under trio's autojump clock: when to linger, and each way a
lingering close ends (eof, timeout, time, bytes, error)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from proxy import linger
from proxy.config import Address, Listener

LST = Listener("web", Address("127.0.0.1", 0), "http", "app",
               lingering_time=30.0, lingering_timeout=5.0)


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize(("mode", "request_read", "pending", "eof", "expect"), [
    ("off", False, True, False, False),
    ("on", False, False, False, True),  # the request was not read whole: more may come
    ("on", True, False, False, False),  # read whole, nothing after it: close at once
    ("on", True, True, False, True),  # bytes after it wait in the socket
    ("on", False, True, True, False),  # the client has ended its side already
    ("always", True, False, False, True),
    ("always", False, False, True, False),
])
def test_wanted(mode: str, request_read: bool, pending: bool, eof: bool, expect: bool) -> None:
    with pair() as (ours, theirs):
        if pending:
            theirs.send(b"GET / HTTP/1.1\r\n")
        assert linger.wanted(mode, ours, request_read=request_read, eof=eof) is expect


async def until_eof(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            return out
        out += chunk


async def test_answer_then_eof_and_the_client_ends_it(autojump_clock: trio.abc.Clock) -> None:
    with pair() as (ours, theirs), trio.fail_after(60):
        ours.send(b"answer")
        theirs.send(b"the rest of a request")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(linger.linger_close, ours, LST)
            assert await until_eof(theirs) == b"answer"  # our FIN follows the answer at once
            theirs.shutdown(socket.SHUT_WR)
        assert ours.fileno() == -1


async def test_idle_client_is_let_go_after_lingering_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    with pair() as (ours, theirs), trio.fail_after(60):
        theirs.send(b"x" * 1000)
        t0 = trio.current_time()
        assert await linger.linger_close(ours, LST) == "timeout"
        assert trio.current_time() - t0 == pytest.approx(5.0)


async def test_endless_sender_is_cut_after_lingering_time(
        autojump_clock: trio.abc.Clock) -> None:
    with pair() as (ours, theirs), trio.fail_after(120):
        async def trickle() -> None:
            with pytest.raises(OSError):  # cut: the close resets what it still sends
                while True:
                    theirs.send(b"x" * 100)
                    await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            t0 = trio.current_time()
            assert await linger.linger_close(ours, LST) == "time"
            assert 30.0 <= trio.current_time() - t0 <= 31.0


async def test_discarding_stops_at_max_bytes(autojump_clock: trio.abc.Clock) -> None:
    with pair() as (ours, theirs), trio.fail_after(60):
        theirs.send(b"x" * 100_000)
        assert await linger.linger_close(ours, LST, max_bytes=50_000) == "bytes"


async def test_a_reset_ends_it(autojump_clock: trio.abc.Clock) -> None:
    with pair() as (ours, theirs), trio.fail_after(60):
        ours.send(b"answer")
        theirs.send(b"more")
        theirs.close()  # our answer unread: a unix socketpair reports ECONNRESET too
        assert await linger.linger_close(ours, LST) in ("error", "eof")
