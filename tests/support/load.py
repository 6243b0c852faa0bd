"""Trio load for upgrade tests: an echo backend, sequence-numbered streams, short connections.

A `SeqStream` sends bursts of `seq\\n` lines and checks every echo against what it sent: a lost
byte stalls it (its timeout fails it), a duplicated or reordered one breaks the comparison. It
records its worst gap between replies (the stall an upgrade caused).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from proxy.demo import echo_handler

LINE = 9  # b"%08d\n"


async def start_echo(nursery: trio.Nursery) -> int:
    """An echo server on 127.0.0.1 running in `nursery`; returns its port."""
    listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@dataclass
class SeqStream:
    port: int
    ident: int
    timeout: float = 10.0
    seq: int = 0
    max_gap: float = 0.0
    error: str = ""
    open: bool = False
    replies: int = 0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (time, gap) over 50 ms

    async def run(self, stop: trio.Event, pace: float = 0.005) -> None:
        rng = random.Random(self.ident)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        self.open = True
        buf = bytearray()
        last = trio.current_time()
        try:
            async with stream:
                while not stop.is_set():
                    burst = rng.randint(1, 4)
                    out = b"".join(b"%08d\n" % (self.seq + i) for i in range(burst))
                    with trio.fail_after(self.timeout):
                        await stream.send_all(out)
                        while len(buf) < len(out):
                            chunk = await stream.receive_some(65536)
                            if not chunk:
                                raise EOFError("stream closed by the proxy")
                            buf += chunk
                    got, buf = bytes(buf[:len(out)]), buf[len(out):]
                    if got != out:
                        raise AssertionError(f"expected {out!r}, got {got!r}")
                    now = trio.current_time()
                    gap = now - last
                    last = now
                    self.max_gap = max(self.max_gap, gap)
                    if gap > 0.05:
                        self.gaps.append((now, gap))
                    self.seq += burst
                    self.replies += 1
                    await trio.sleep(pace)
        except (OSError, EOFError, AssertionError, trio.TooSlowError,
                trio.BrokenResourceError) as exc:
            self.error = f"stream {self.ident} at seq {self.seq}: {type(exc).__name__}: {exc}"
        finally:
            self.open = False


@dataclass
class ShortConns:
    """Open, echo one line, close; again and again. Every failure is kept, and what it did is
    counted (for tests that compare the proxy's counters with it)."""

    port: int
    ident: int = 0
    pace: float = 0.002  # pause between connections (0: just a checkpoint)
    connected: int = 0  # TCP connect succeeded (the proxy's listen backlog took it)
    ok: int = 0  # echo verified
    sent: int = 0  # bytes written
    received: int = 0  # bytes read
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: trio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                with trio.fail_after(10):
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                    self.connected += 1
                    async with stream:
                        msg = b"short %d line %d\n" % (self.ident, n)
                        await stream.send_all(msg)
                        self.sent += len(msg)
                        got = b""
                        while len(got) < len(msg):
                            chunk = await stream.receive_some(100)
                            if not chunk:
                                raise EOFError(f"EOF after {got!r}")
                            got += chunk
                            self.received += len(chunk)
                        if got != msg:
                            raise AssertionError(f"{got!r} != {msg!r}")
                self.ok += 1
            except (OSError, EOFError, AssertionError, trio.TooSlowError,
                    trio.BrokenResourceError) as exc:
                self.failures.append(f"{self.ident} #{n}: {type(exc).__name__}: {exc}")
            await trio.sleep(self.pace)


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `cond` until true; fail after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


class StreamSet:
    """N sequence-checked streams through a proxy port, started in a nursery, stopped together."""

    def __init__(self, port: int, n: int) -> None:
        self.stop = trio.Event()
        self.streams = [SeqStream(port, i) for i in range(n)]

    def start(self, nursery: trio.Nursery) -> StreamSet:
        for s in self.streams:
            nursery.start_soon(s.run, self.stop)
        return self

    async def finish(self) -> None:
        self.stop.set()
        await wait_until(lambda: not any(s.open for s in self.streams))
