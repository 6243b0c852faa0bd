"""Counter continuity across hot upgrades must be exact: every connection, request and byte the
proxy relays is counted exactly once over all generations.

Regression test for "proxy_connections_accepted_total ends one below the connections the backend
saw". The old generation sends a metrics snapshot in RELEASED and, in DONE, what it counted since
"then"; "then" must be that very snapshot. It used to be a second snapshot taken after the
RELEASED send, which yields: whatever the old generation counted during that yield (the accept
loop, woken before stop_accepting(), accepting one last connection; a response still streaming
there; a request finishing there) was in neither message.

tcp: short connections (open, echo a line, close) loop through several upgrades (the race is a
narrow one: this test catches it in about half the runs). http: a response streams in the old
generation across each RELEASED (the old generation counts at nearly every scheduling point, so
this one catches it nearly every time), beside a loop of one-request connections. Then the
clients stop, every generation but the last has exited, the last holds nothing, and the scraped
counters must equal what the backend saw and what the clients sent and received.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend, echo
from tests.support.load import ShortConns, wait_until
from tests.support.proc import Proxy, alive

UPGRADES = int(os.environ.get("COUNT_EXACT_UPGRADES", "8"))
CLIENTS = int(os.environ.get("COUNT_EXACT_CLIENTS", "4"))


def scrape(p: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10).read()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def each_progressed(clients: list[ShortConns]) -> Callable[[], bool]:
    """True once every client completed another connection since now."""
    mark = [c.ok for c in clients]
    return lambda: all(c.ok > k for c, k in zip(clients, mark, strict=True))


async def test_short_connections_counted_exactly_once_across_upgrades() -> None:
    backend = Backend(echo)
    p = Proxy([backend.addr], proxy={"drain_timeout": 10.0})
    try:
        with trio.fail_after(240):
            await trio.to_thread.run_sync(p.start)
            clients = [ShortConns(p.port, i, pace=0) for i in range(CLIENTS)]
            stop = trio.Event()
            pids = [p.pid()]
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(c.run, stop)
                for _ in range(UPGRADES):
                    # every client gets through before the next upgrade: the loop really runs
                    # across each handover
                    await wait_until(each_progressed(clients))
                    pids.append(await trio.to_thread.run_sync(p.upgrade))
                await wait_until(each_progressed(clients))
                stop.set()
            # Every generation but the last has exited (so each sent its DONE delta)...
            await wait_until(lambda: not any(alive(pid) for pid in pids[:-1]))
            assert p.serving_pid() == pids[-1]
            # ...and the last one holds no connection any more (every byte relayed is counted).

            def idle() -> bool:
                m = scrape(p)
                return value(m, "proxy_connections_active", listener="web") == 0
            await wait_until(idle)
            m = scrape(p)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(p.stop)
            backend.close()
    connected = sum(c.connected for c in clients)
    ok = sum(c.ok for c in clients)
    sent = sum(c.sent for c in clients)
    received = sum(c.received for c in clients)
    failures = [f for c in clients for f in c.failures]
    accepted = value(m, "proxy_connections_accepted_total", listener="web")
    c2u = value(m, "proxy_bytes_total", listener="web", direction="client_to_upstream")
    u2c = value(m, "proxy_bytes_total", listener="web", direction="upstream_to_client")
    upgrades = value(m, "proxy_upgrades_total", result="success")
    summary = (f"upgrades={upgrades:.0f} generations={len(set(pids))} "
               f"client_connected={connected} client_ok={ok} client_failed={len(failures)} "
               f"backend_accepted={backend.accepted} proxy_accepted={accepted:.0f} "
               f"client_sent={sent} proxy_c2u={c2u:.0f} "
               f"client_received={received} proxy_u2c={u2c:.0f}")
    print(summary)
    assert upgrades == UPGRADES, summary
    assert not failures, (summary, failures[:5])
    assert connected == ok == backend.accepted, summary
    assert accepted == backend.accepted, summary
    assert c2u == sent, summary
    assert u2c == received, summary


# ---- http mode: a response streaming in the old generation across RELEASED ---------------------
# An http exchange in progress cannot move: it finishes in the old generation, which keeps
# counting its bytes after RELEASED (they must arrive in DONE's delta). With the backend writing
# as fast as the client reads, the old generation counts bytes at almost every scheduling point,
# including the one inside the RELEASED send: a count taken there must not fall between the
# snapshot RELEASED carries and the base of DONE's delta.

CHUNK = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
HTTP_UPGRADES = int(os.environ.get("COUNT_EXACT_HTTP_UPGRADES", "4"))


def http_app(conn: socket.socket, backend: Backend) -> None:
    """Keep-alive HTTP/1.1: GET /stream answers chunks until `backend.data["finish"]` is set;
    anything else a short body. Counts requests in `backend.data["requests"]`."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        path = head.split(b" ", 2)[1]
        with backend.lock:
            backend.data["requests"] = backend.data.get("requests", 0) + 1
        if path.startswith(b"/stream"):
            finish: threading.Event = backend.data["finish"]
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not finish.is_set():
                conn.sendall(CHUNK)
            conn.sendall(b"0\r\n\r\n")
        else:
            body = b"ok " + path + b"\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@dataclass
class HttpClient:
    """One request per connection (Connection: close), read to EOF; counts what it did."""

    port: int
    ok: int = 0
    received: int = 0
    current: int = 0  # bytes of the response being read
    failures: list[str] = field(default_factory=list)

    async def get(self, path: str) -> None:
        self.current = 0
        try:
            with trio.fail_after(30):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with stream:
                    await stream.send_all(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                                          % path.encode())
                    first = tail = b""
                    while chunk := await stream.receive_some(65536):
                        self.received += len(chunk)
                        self.current += len(chunk)
                        first = (first + chunk[:16])[:16]
                        tail = (tail + chunk)[-16:]
                    if not first.startswith(b"HTTP/1.1 200 "):
                        raise AssertionError(f"{path}: response starts {first!r}")
                    if path == "/stream" and not tail.endswith(b"\r\n0\r\n\r\n"):
                        raise AssertionError(f"{path}: response ends {tail!r}")
            self.ok += 1
        except (OSError, AssertionError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.failures.append(f"{path}: {type(exc).__name__}: {exc}")

    async def run(self, stop: trio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await self.get(f"/short/{n}")
            await trio.lowlevel.checkpoint()


def upgrade_during(p: Proxy, after_released: Callable[[], None], timeout: float = 30.0) -> int:
    """Like Proxy.upgrade, calling `after_released` once the new generation serves (RELEASED
    passed) and before waiting for the old one to exit."""
    old = p.pid()
    mark = len(p.text())
    os.kill(old, signal.SIGUSR2)
    new = int(p.wait_log(r"event=takeover_serving gen=\d+ pid=(\d+)", start=mark,
                         timeout=timeout).group(1))
    after_released()
    deadline = time.monotonic() + timeout
    while alive(old) or p.serving_pid() != new:
        assert time.monotonic() < deadline, f"old generation {old} did not exit:\n{p.tail()}"
        time.sleep(0.01)
    p.wait_log(rf"event=takeover_done gen=\d+ pid={new}", start=mark, timeout=timeout)
    return new


async def test_http_requests_and_bytes_counted_exactly_once_across_upgrades() -> None:
    backend = Backend(http_app)
    p = Proxy([backend.addr], mode="http", proxy={"drain_timeout": 20.0})
    try:
        with trio.fail_after(240):
            await trio.to_thread.run_sync(p.start)
            shorts = HttpClient(p.port)
            streamer = HttpClient(p.port)
            stop = trio.Event()
            pids = [p.pid()]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shorts.run, stop)
                for _ in range(HTTP_UPGRADES):
                    finish = threading.Event()
                    backend.data["finish"] = finish
                    done = trio.Event()

                    async def stream(done: trio.Event = done) -> None:
                        await streamer.get("/stream")
                        done.set()
                    nursery.start_soon(stream)
                    # the response streams (the old generation counts its bytes) before SIGUSR2
                    await wait_until(lambda: streamer.current > 1 << 20)
                    pids.append(await trio.to_thread.run_sync(upgrade_during, p, finish.set))
                    await done.wait()
                mark = shorts.ok
                await wait_until(lambda: shorts.ok > mark)
                stop.set()
            await wait_until(lambda: not any(alive(pid) for pid in pids[:-1]))
            assert p.serving_pid() == pids[-1]

            def idle() -> bool:
                return value(scrape(p), "proxy_connections_active", listener="web") == 0
            await wait_until(idle)
            m = scrape(p)
    finally:
        with trio.CancelScope(shield=True):
            if "finish" in backend.data:
                backend.data["finish"].set()
            await trio.to_thread.run_sync(p.stop)
            backend.close()
    clients = [shorts, streamer]
    ok = sum(c.ok for c in clients)
    received = sum(c.received for c in clients)
    failures = [f for c in clients for f in c.failures]
    accepted = value(m, "proxy_connections_accepted_total", listener="web")
    requests = value(m, "proxy_http_requests_total", listener="web", code="200")
    all_requests = sum(v for (n, _), v in m.items() if n == "proxy_http_requests_total")
    u2c = value(m, "proxy_bytes_total", listener="web", direction="upstream_to_client")
    summary = (f"upgrades={value(m, 'proxy_upgrades_total', result='success'):.0f} "
               f"client_ok={ok} client_failed={len(failures)} streams={streamer.ok} "
               f"backend_requests={backend.data.get('requests', 0)} "
               f"proxy_accepted={accepted:.0f} proxy_requests_200={requests:.0f} "
               f"proxy_requests_all={all_requests:.0f} "
               f"client_received={received} proxy_u2c={u2c:.0f}")
    print(summary)
    assert not failures, (summary, failures[:5])
    assert streamer.ok == HTTP_UPGRADES, summary
    assert ok == backend.data["requests"] == requests == all_requests, summary
    assert accepted == ok, summary
    assert u2c == received, summary
