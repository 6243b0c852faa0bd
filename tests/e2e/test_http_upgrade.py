"""http mode across hot upgrades: keep-alive connections, a slow request in flight, a tunnel and
a half-received request head all carry on, each on its *same* client connection."""

from __future__ import annotations

import json
import threading
import time

from tests.e2e.test_tcp import metric
from tests.support.httpbackend import HttpBackend
from tests.support.proc import Proxy, alive
from tests.support.rawhttp import Conn


class KeepAliveClient(threading.Thread):
    """GETs in a loop on one connection; any error, reconnect or wrong answer is recorded."""

    def __init__(self, port: int, ident: int) -> None:
        super().__init__(daemon=True)
        self.port, self.client_id = port, ident
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with Conn(self.port) as c:
                while not self.stop.is_set():
                    path = f"/echo?c={self.client_id}&n={self.ok}"
                    status, _, body = c.get(path)
                    if status != 200 or json.loads(body)["path"] != path:
                        raise AssertionError(f"{status} {body[:100]!r} for {path}")
                    self.ok += 1
                    time.sleep(0.002)
        except Exception as exc:  # recorded, asserted on by the test
            self.errors.append(f"client {self.client_id} after {self.ok}: {exc!r}")


class TunnelClient(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.frames = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with Conn(self.port) as c:
                c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
                assert c.response()[0] == 101
                pending = c.buf
                while not self.stop.is_set():
                    msg = b"<frame %08d>" % self.frames
                    c.send(msg)
                    while len(pending) < len(msg):
                        chunk = c.sock.recv(4096)
                        if not chunk:
                            raise EOFError("tunnel closed")
                        pending += chunk
                    got, pending = pending[:len(msg)], pending[len(msg):]
                    if got != msg:
                        raise AssertionError(f"{got!r} != {msg!r}")
                    self.frames += 1
                    time.sleep(0.002)
        except Exception as exc:  # recorded, asserted on by the test
            self.errors.append(repr(exc))


def test_ten_upgrades_lose_no_request_on_keepalive_connections() -> None:
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", listener={"header_timeout": 10.0})
        clients: list[KeepAliveClient] = []
        tunnel = TunnelClient(0)
        try:
            p.start()
            clients = [KeepAliveClient(p.port, i) for i in range(8)]
            tunnel = TunnelClient(p.port)
            for t in [*clients, tunnel]:
                t.start()
            deadline = time.monotonic() + 20
            while not (all(c.ok for c in clients) and tunnel.frames):
                assert time.monotonic() < deadline, [c.errors for c in clients] + tunnel.errors
                time.sleep(0.01)
            slow_results: list[int] = []
            for i in range(10):
                if i % 3 == 0:  # a slow request is in flight while the upgrade starts
                    slow = Conn(p.port)
                    slow.send(b"GET /slow?ms=700 HTTP/1.1\r\nHost: t\r\n\r\n")
                    while not any(path.startswith("/slow") for _, path, _ in be.requests[-50:]):
                        time.sleep(0.005)
                    old = p.pid()
                    new = p.upgrade()
                    slow_results.append(slow.response()[0])
                    slow_results.append(slow.get("/echo?after-slow")[0])  # same connection, moved
                    slow.close()
                else:
                    old = p.pid()
                    new = p.upgrade()
                assert new != old and not alive(old)
                marks = [c.ok for c in clients] + [tunnel.frames]
                deadline = time.monotonic() + 20
                while not all(n > m for n, m in zip([c.ok for c in clients] + [tunnel.frames],
                                                     marks, strict=True)):
                    assert time.monotonic() < deadline, "clients stopped making progress"
                    time.sleep(0.01)
            moved_http = metric(p, "proxy_handover_connections_total", mode="http") + metric(
                p, "proxy_handover_connections_total", mode="http_exchange")
            moved_tunnel = metric(p, "proxy_handover_connections_total", mode="tunnel")
        finally:
            threads: list[KeepAliveClient | TunnelClient] = [*clients, tunnel]
            for t in threads:
                t.stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(timeout=10)
            p.stop()
    errors = [e for c in clients for e in c.errors] + tunnel.errors
    assert not errors, errors
    assert slow_results == [200, 200] * 4
    assert moved_http >= 8 * 10 and moved_tunnel >= 10  # (idle or mid-exchange)
    assert sum(c.ok for c in clients) > 100


def test_half_received_request_head_moves_with_its_connection() -> None:
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", listener={"header_timeout": 20.0})
        try:
            p.start()
            with Conn(p.port) as c:
                assert c.get("/echo?first")[0] == 200
                # Half a head, plus nothing more until the next generation serves: the bytes
                # sit in the old generation's h11 buffer and must travel with the socket.
                c.send(b"GET /echo?second HTTP/1.1\r\nHo")
                p.upgrade()
                c.send(b"st: t\r\n\r\nGET /echo?third HTTP/1.1\r\nHost: t\r\n\r\n")
                r2, r3 = c.response(), c.response()
                assert (r2[0], json.loads(r2[2])["path"]) == (200, "/echo?second")
                assert (r3[0], json.loads(r3[2])["path"]) == (200, "/echo?third")
            assert p.count(r"event=access .*path=\"?/echo\?second\"? status=200") == 1
        finally:
            p.stop()


def test_upgrade_right_after_an_upgrade_while_a_slow_response_is_in_flight() -> None:
    """The measured lost signal: a response that cannot move (a chunked stream to an HTTP/1.0
    client, which h11 de-chunks: its copy path) holds the old generation; a second upgrade at
    once starts at once (the new generation serves), both commands report success before that
    response is done, and it then completes from the first generation; every request counted
    exactly once."""
    import socket
    import subprocess
    import sys

    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", listener={"header_timeout": 20.0},
                  proxy={"drain_timeout": 30.0})
        try:
            p.start()
            first = p.pid()
            slow = Conn(p.port, timeout=30)
            slow.send(b"GET /sse?n=400&ms=20 HTTP/1.0\r\nHost: t\r\n\r\n")
            deadline = time.monotonic() + 10
            while not any(path.startswith("/sse") for _, path, _ in be.requests[-50:]):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            cmd = [sys.executable, "-m", "proxy", "upgrade", "--config", str(p.config)]
            outs = [subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=p.env)
                    for _ in range(2)]
            # Not the end of the slow response yet: both upgrades were done while it was pending.
            pending_when_done = b"event 399" not in slow.sock.recv(
                1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
            assert pending_when_done  # both upgrades finished with the slow one in flight
            assert alive(first)  # still holding it: three generations at once, one serving
            third = p.pid()
            assert p.count(r"event=upgrade_ignored") == 0
            status, _, body = slow.response()
            assert status == 200 and body.count(b"data: event") == 400
            slow.close()  # (h11 re-framed it for us; the connection closes after it)
            with Conn(p.port) as c:
                assert c.get("/echo?after-slow")[0] == 200
            deadline = time.monotonic() + 30
            while alive(first) or len([q for q in p.all_pids() if alive(q)]) != 1:
                assert time.monotonic() < deadline, p.tail()
                time.sleep(0.02)
            assert p.serving_pid() == third
            assert metric(p, "proxy_generation") == 3
            assert metric(p, "proxy_http_requests_total", listener="web") == 2
            assert metric(p, "proxy_connections_accepted_total", listener="web") == 2
        finally:
            p.stop()
