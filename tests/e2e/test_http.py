"""http mode end to end: curl and a raw-socket client against the real proxy process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.e2e.test_tcp import metric
from tests.support.backends import Blackhole, dead_port
from tests.support.httpbackend import HttpBackend
from tests.support.proc import Proxy, running
from tests.support.rawhttp import Conn

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30)


@contextmanager
def http_proxy(servers: list[str], *, listener: dict[str, Any] | None = None,
               upstream: dict[str, Any] | None = None) -> Iterator[Proxy]:
    with running(servers, mode="http", listener={"header_timeout": 5.0, **(listener or {})},
                 upstream=upstream) as p:
        yield p


@needs_curl
def test_keepalive_reuse_and_forwarding_headers() -> None:
    with HttpBackend() as be, http_proxy([be.addr]) as p:
        url = f"http://127.0.0.1:{p.port}"
        res = curl("-v", "-w", "\n", f"{url}/echo?a=1", f"{url}/echo?a=2", "-H", "X-Forwarded-For: 10.9.9.9",
                   "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: hop",
                   "-H", "X-Forwarded-Proto: https")
        assert res.returncode == 0, res.stderr
        assert "Re-using existing connection" in res.stderr  # one client connection
        bodies = [json.loads(line) for line in res.stdout.splitlines()]
        assert [b["path"] for b in bodies] == ["/echo?a=1", "/echo?a=2"]
        h = {k.lower(): v for k, v in bodies[0]["headers"].items()}
        assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
        assert h["x-forwarded-proto"] == "http"  # a client cannot claim https past us
        assert h["x-forwarded-host"] == f"127.0.0.1:{p.port}"
        assert h["via"] == "1.1 proxy"
        assert "x-secret" not in h and "connection" not in h  # hop-by-hop, named or not
        assert "< via: 1.1 proxy" in res.stderr.lower()
        assert be.connections == 1  # the upstream connection was pooled and reused
        p.wait_log(r"event=access .*method=GET path=\"?/echo\?a=2\"? status=200")
        assert metric(p, "proxy_http_requests_total", listener="web", code="200") == 2
        assert metric(p, "proxy_http_request_duration_seconds_count", listener="web") == 2


def test_pipelined_requests_answered_in_order() -> None:
    with HttpBackend() as be, http_proxy([be.addr]) as p, Conn(p.port) as c:
        c.send(b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(5)))
        paths = [json.loads(c.response()[2])["path"] for _ in range(5)]
        assert paths == [f"/echo?n={i}" for i in range(5)]


@needs_curl
def test_chunked_both_ways(tmp_path: object) -> None:
    data = os.urandom(3_000_000)
    with HttpBackend() as be, http_proxy([be.addr]) as p:
        up = subprocess.run([CURL or "curl", "-sS", "--max-time", "30", "-X", "POST", "-H",
                             "Transfer-Encoding: chunked", "--data-binary", "@-",
                             f"http://127.0.0.1:{p.port}/upload"], input=data,
                            capture_output=True, timeout=60)
        assert up.returncode == 0, up.stderr
        got = json.loads(up.stdout)
        assert got == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert {k.lower(): v for k, v in be.requests[-1][2].items()}.get(
            "transfer-encoding") == "chunked"
        with Conn(p.port) as c:
            status, headers, body = c.get("/big?n=5000000")
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == (hashlib.sha256(b"big").digest() * 2048 * 77)[:5_000_000]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_bodies_stream_with_bounded_memory() -> None:
    size = 256 << 20
    with HttpBackend() as be, http_proxy([be.addr]) as p:
        pid = p.pid()
        before = _rss_kib(pid)
        with Conn(p.port, timeout=60) as c:
            c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            block = os.urandom(1 << 20)
            h = hashlib.sha256()
            for _ in range(size >> 20):
                c.send(block)
                h.update(block)
            status, _, body = c.response()
            assert status == 200
            assert json.loads(body) == {"bytes": size, "sha256": h.hexdigest()}
            c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
            status, _, body = c.response()
            assert status == 200 and len(body) == size
        grown_mib = (_rss_kib(pid) - before) / 1024
        assert grown_mib < 64, f"proxy peak RSS grew {grown_mib:.0f} MiB for 256 MiB bodies"


def test_502_when_no_server_answers() -> None:
    with http_proxy([f"127.0.0.1:{dead_port()}"]) as p, Conn(p.port) as c:
        status, headers, body = c.get("/echo")
        assert status == 502 and headers.get("connection") == "close" and b"502" in body
        assert metric(p, "proxy_http_requests_total", code="502") == 1


def test_failover_retries_only_what_was_not_sent() -> None:
    with HttpBackend() as be, http_proxy([f"127.0.0.1:{dead_port()}", be.addr]) as p:
        for i in range(4):
            with Conn(p.port) as c:
                c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
                status, _, body = c.response()
                assert status == 200 and json.loads(body)["bytes"] == 3, i
        assert len(be.requests) == 4  # each exactly once, never replayed


def test_504_when_the_response_is_late() -> None:
    with HttpBackend() as be, http_proxy([be.addr], listener={"response_timeout": 0.3}) as p, \
            Conn(p.port) as c:
        status, _, _ = c.get("/slow?ms=2000")
        assert status == 504


def test_400_on_a_malformed_request_and_431_on_a_huge_head() -> None:
    with HttpBackend() as be, http_proxy([be.addr], listener={"max_header_size": 4096}) as p:
        with Conn(p.port) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
            assert c.response()[0] == 400
            with pytest.raises(EOFError):
                c.response()  # and the connection is closed
        with Conn(p.port) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
            assert c.response()[0] == 431
        assert be.requests == []


def test_408_when_the_head_trickles_in() -> None:
    with HttpBackend() as be, http_proxy([be.addr], listener={"header_timeout": 0.5}) as p, \
            Conn(p.port) as c:
        c.send(b"GET /echo HTTP/1.1\r\nHo")  # ...and never the rest (slowloris)
        t0 = time.monotonic()
        assert c.response()[0] == 408
        assert time.monotonic() - t0 < 5
        assert be.requests == []


def test_503_above_max_connections() -> None:
    with HttpBackend() as be, http_proxy([be.addr], listener={"max_connections": 1}) as p, \
            Conn(p.port) as first:
        assert first.get("/echo")[0] == 200
        with Conn(p.port) as second:
            status, headers, _ = second.get("/echo")
            assert status == 503 and headers["connection"] == "close"
        assert first.get("/echo")[0] == 200  # the one admitted is served as before


# (name, raw bytes, refused before anything reaches the backend)
SMUGGLING = [
    ("CL+TE", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 44\r\nTransfer-Encoding: chunked"
              b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", True),
    ("TE+CL", b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4"
              b"\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n0\r\n\r\n", True),
    ("duplicate CL", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 38"
                     b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", True),
    ("TE not chunked", b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"
                       b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", True),
    ("space before colon", b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n"
                           b"Content-Length: 38\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
     True),
    # h11 unfolds obs-fold into the previous header's value (RFC 9112 5.2 allows it): what
    # looked like a TE header is part of X-A, and the body is the CL's 38 bytes: one request.
    ("obs-fold TE", b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 35\r\nX-A: b\r\n"
                    b" Transfer-Encoding: chunked\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
     False),
    # Bare LF ends lines for h11 as for most servers; re-serialised with CRLF it is one request.
    ("bare LF", b"POST /a HTTP/1.1\nHost: t\nContent-Length: 35\n\n"
                b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", False),
    # The head is valid and goes upstream; the body is not: the upstream connection is cut.
    ("bad chunk size", b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", False),
    ("chunk size overflow", b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"fffffffffffffffffff1\r\nGET /smuggled HTTP/1.1\r\n\r\n", False),
]


@pytest.mark.parametrize(("raw", "refused"), [(r, f) for _, r, f in SMUGGLING],
                         ids=[n for n, _, _ in SMUGGLING])
def test_smuggling_never_reaches_the_backend_as_two_requests(raw: bytes, refused: bool) -> None:
    with HttpBackend() as be, http_proxy([be.addr]) as p, Conn(p.port) as c:
        c.send(raw)
        statuses = []
        # A refusal or an answer comes at once; the chunk-size-overflow case gets none (its
        # body would be 2^80 bytes long) and the upstream connection stays cut.
        c.sock.settimeout(2.0)
        try:
            for _ in range(3):
                statuses.append(c.response()[0])
                c.sock.settimeout(0.5)  # a second answer would come at once, or never
        except (EOFError, TimeoutError, ConnectionResetError):
            pass
        paths = [path for _, path, _ in be.requests]
        assert "/smuggled" not in paths, (paths, statuses)
        assert len(paths) <= 1, paths
        if refused:
            assert paths == [] and statuses[:1] in ([400], [501]), (paths, statuses)


def test_upgrade_tunnel_echoes_with_early_bytes() -> None:
    with HttpBackend() as be, http_proxy([be.addr]) as p, Conn(p.port) as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
               b"early bytes|")  # sent before the 101: h11's trailing data must carry over
        status, headers, _ = c.response()
        assert status == 101 and headers["upgrade"] == "websocket"
        got = c.buf
        while len(got) < len(b"early bytes|"):
            got += c.sock.recv(100)
        assert got == b"early bytes|"
        for i in range(20):
            msg = b"frame %d" % i
            c.send(msg)
            echo = b""
            while len(echo) < len(msg):
                echo += c.sock.recv(100)
            assert echo == msg
        assert metric(p, "proxy_http_requests_total", code="101") == 1


def test_blackholed_server_fails_over_within_connect_timeout() -> None:
    hole = Blackhole()
    try:
        with HttpBackend() as be, http_proxy([hole.addr, be.addr],
                                             upstream={"connect_timeout": 0.3}) as p, Conn(p.port) as c:
            assert c.get("/echo")[0] == 200
    finally:
        hole.close()


def test_graceful_stop_closes_idle_keepalive_and_finishes_busy() -> None:
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http")
        try:
            p.start()
            idle = Conn(p.port)
            assert idle.get("/echo")[0] == 200
            busy = Conn(p.port)
            busy.send(b"GET /slow?ms=800 HTTP/1.1\r\nHost: t\r\n\r\n")
            deadline = time.monotonic() + 10
            while not any(path.startswith("/slow") for _, path, _ in be.requests):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(p.pid(), 15)
            status, _, _ = busy.response()
            assert status == 200  # the request in flight completed
            with pytest.raises(EOFError):
                idle.get("/echo")  # the idle keep-alive connection was closed
            assert p.proc is not None and p.proc.wait(timeout=15) == 0
            busy.close()
            idle.close()
        finally:
            p.stop()



