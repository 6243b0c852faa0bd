"""Processes the host-migration tests run inside network namespaces (`ip netns exec NS python
-m tests.support.mignet_peer ...`), talking to the test over stdin/stdout, one line each.

`servers HOST`: an echo server on HOST:9000 and an http server on HOST:9001 (keep-alive;
`GET /echo/N` answers N, `GET /stream` sends `%08d\\n` chunks every 10 ms until the client
goes). Prints "ready".

`clients HOST PORT --streams N --http M --stream`: N sequence-checked echo streams, M keep-alive
http clients plus one websocket-style tunnel (an HTTP Upgrade, then echo lines) when M > 0, and
(with --stream) one streaming response, all through the proxy at HOST:PORT.
Prints "ready" once all are flowing; on the line "mark" the echo streams forget their worst
round trip so far (answers "marked"); on the line "stop" it stops, checks that every byte came
back exactly once, and prints one JSON line: errors, counts and the worst stall seen.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import dataclass, field
from functools import partial

import trio

STREAM_PACE = 0.05
HTTP_PACE = 0.02


async def echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_head(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


async def http_server(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        async with stream:
            while (head := await _read_head(stream, buf)) is not None:
                target = head.split(b" ")[1]
                if b"\r\nupgrade: " in head.lower():  # a websocket-style tunnel: 101, then echo
                    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n"
                                          b"upgrade: echo\r\nconnection: upgrade\r\n\r\n")
                    if buf:
                        await stream.send_all(bytes(buf))
                    while data := await stream.receive_some(65536):
                        await stream.send_all(data)
                    return
                if target == b"/stream":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    n = 0
                    while True:
                        line = b"%08d\n" % n
                        await stream.send_all(b"%x\r\n%s\r\n" % (len(line), line))
                        n += 1
                        await trio.sleep(0.01)
                body = target.rsplit(b"/", 1)[-1] + b"\n"
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                      % (len(body), body))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def servers(host: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_tcp, echo, 9000, host=host, backlog=4096))
        await nursery.start(partial(trio.serve_tcp, http_server, 9001, host=host, backlog=4096))
        print("ready", flush=True)


@dataclass
class Stats:
    errors: list[str] = field(default_factory=list)
    lines: int = 0
    requests: int = 0
    chunks: int = 0
    max_gap: float = 0.0
    gaps: list[float] = field(default_factory=list)  # per client, its worst gap
    rtts: list[float] = field(default_factory=list)  # per echo stream, its worst line round trip
    pace: float = STREAM_PACE
    epoch: int = 0  # bumped by "mark": every client forgets its worst so far
    open: int = 0
    tunnels: int = 0


async def seq_stream(host: str, port: int, ident: int, stats: Stats, stop: trio.Event,
                     started: trio.Event, want: int, upgrade: bool = False) -> None:
    """Echo lines, each checked. `upgrade`: first an HTTP Upgrade (a websocket-style tunnel
    through an http listener), then the same lines inside it."""
    seq, worst, worst_rtt, epoch = 0, 0.0, 0.0, 0
    try:
        stream = await trio.open_tcp_stream(host, port)
        buf = bytearray()
        if upgrade:
            await stream.send_all(b"GET /tunnel HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n"
                                  b"upgrade: echo\r\n\r\n")
            with trio.fail_after(10):
                head = await _read_head(stream, buf)
            if head is None or not head.startswith(b"HTTP/1.1 101"):
                raise AssertionError(f"upgrade answered {head!r}")
            stats.tunnels += 1
        else:
            stats.open += 1
            if stats.open == want:
                started.set()
        async with stream:
            last = trio.current_time()
            while not stop.is_set():
                out = b"%08d\n" % seq
                if epoch != stats.epoch:
                    epoch, worst, worst_rtt = stats.epoch, 0.0, 0.0
                sent_at = trio.current_time()
                with trio.fail_after(20):
                    await stream.send_all(out)
                    while len(buf) < len(out):
                        data = await stream.receive_some(65536)
                        if not data:
                            raise EOFError("closed by the proxy")
                        buf += data
                got, buf = bytes(buf[:len(out)]), buf[len(out):]
                if got != out:
                    raise AssertionError(f"expected {out!r}, got {got!r}")
                now = trio.current_time()
                worst, last = max(worst, now - last), now
                worst_rtt = max(worst_rtt, now - sent_at)
                seq += 1
                stats.lines += 1
                await trio.sleep(stats.pace * (0.5 + (ident * 7919 % 1000) / 1000))
    except Exception as exc:
        stats.errors.append(f"stream {ident} at {seq}: {type(exc).__name__}: {exc}")
    stats.gaps.append(worst)
    stats.rtts.append(worst_rtt)


async def http_client(host: str, port: int, ident: int, stats: Stats, stop: trio.Event) -> None:
    n, worst = 0, 0.0
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            buf = bytearray()
            last = trio.current_time()
            while not stop.is_set():
                with trio.fail_after(20):
                    await stream.send_all(b"GET /echo/%d-%d HTTP/1.1\r\nhost: x\r\n\r\n"
                                          % (ident, n))
                    head = await _read_head(stream, buf)
                    if head is None:
                        raise EOFError("closed by the proxy")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(buf) < length:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise EOFError("closed mid-body")
                        buf += data
                body, buf[:] = bytes(buf[:length]), buf[length:]
                if body != b"%d-%d\n" % (ident, n):
                    raise AssertionError(f"request {n}: body {body!r}")
                now = trio.current_time()
                worst, last = max(worst, now - last), now
                n += 1
                stats.requests += 1
                await trio.sleep(HTTP_PACE)
    except Exception as exc:
        stats.errors.append(f"http {ident} at {n}: {type(exc).__name__}: {exc}")
    stats.gaps.append(worst)


async def streaming(host: str, port: int, stats: Stats, stop: trio.Event) -> None:
    """One chunked response that never ends: every `%08d\\n` line in order, once."""
    n, worst = 0, 0.0
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            buf = bytearray()
            head = await _read_head(stream, buf)
            if head is None or b" 200 " not in head:
                raise AssertionError(f"stream head {head!r}")
            last = trio.current_time()
            while not stop.is_set():
                with trio.fail_after(20):
                    while b"\r\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise EOFError("stream closed")
                        buf += data
                    size_line, _, rest = bytes(buf).partition(b"\r\n")
                    size = int(size_line, 16)
                    while len(rest) < size + 2:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise EOFError("stream closed mid-chunk")
                        rest += data
                    chunk, buf[:] = rest[:size], rest[size + 2:]
                if chunk != b"%08d\n" % n:
                    raise AssertionError(f"chunk {n}: {chunk!r}")
                now = trio.current_time()
                worst, last = max(worst, now - last), now
                n += 1
                stats.chunks += 1
    except Exception as exc:
        stats.errors.append(f"streaming at {n}: {type(exc).__name__}: {exc}")
    stats.gaps.append(worst)


async def clients(host: str, port: int, nstreams: int, nhttp: int, with_stream: bool,
                  http_port: int, pace: float) -> None:
    stats = Stats(pace=pace)
    stop = trio.Event()
    started = trio.Event()
    if nstreams == 0:
        started.set()
    async with trio.open_nursery() as nursery:
        for i in range(nstreams):
            nursery.start_soon(seq_stream, host, port, i, stats, stop, started, nstreams)
            if i % 50 == 49:
                await trio.sleep(0.01)
        for i in range(nhttp):
            nursery.start_soon(http_client, host, http_port, i, stats, stop)
        if nhttp:  # and one websocket-style tunnel through the http listener
            nursery.start_soon(seq_stream, host, http_port, -1, stats, stop, started, 0, True)
        if with_stream:
            nursery.start_soon(streaming, host, http_port, stats, stop)
        with trio.fail_after(60):
            await started.wait()
        await trio.sleep(0.3)
        print("ready", flush=True)
        while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "mark":
            stats.epoch += 1  # (the echo streams' worst counts from here)
            print("marked", flush=True)
        stop.set()
    gaps = sorted(stats.gaps)
    rtts = sorted(stats.rtts)
    print(json.dumps({"errors": stats.errors[:20], "nerrors": len(stats.errors),
                      "tunnels": stats.tunnels,
                      "lines": stats.lines, "requests": stats.requests, "chunks": stats.chunks,
                      "clients": len(gaps), "p50": gaps[len(gaps) // 2] if gaps else 0,
                      "p99": gaps[int(len(gaps) * 0.99)] if gaps else 0,
                      "max": gaps[-1] if gaps else 0,
                      "rtt_p50": rtts[len(rtts) // 2] if rtts else 0,
                      "rtt_p99": rtts[int(len(rtts) * 0.99)] if rtts else 0,
                      "rtt_max": rtts[-1] if rtts else 0}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("servers")
    s.add_argument("host")
    c = sub.add_parser("clients")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--http-port", type=int, default=0)
    c.add_argument("--streams", type=int, default=10)
    c.add_argument("--http", type=int, default=0)
    c.add_argument("--stream", action="store_true")
    c.add_argument("--pace", type=float, default=STREAM_PACE,
                   help="mean seconds between an echo stream's lines (each stream its own)")
    a = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.cmd == "servers":
        trio.run(servers, a.host)
    else:
        trio.run(clients, a.host, a.port, a.streams, a.http, a.stream, a.http_port or a.port,
                 a.pace)


if __name__ == "__main__":
    main()
