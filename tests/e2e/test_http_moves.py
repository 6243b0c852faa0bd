"""http exchanges move to the next generation mid-body: a download read slowly, a
server-sent-events stream read by curl, uploads in flight, pipelined requests behind a
streaming response; byte-exact, on the same client connection, the old generation gone at once
(not after drain_timeout)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.e2e.test_tcp import metric
from tests.support.httpbackend import HttpBackend
from tests.support.proc import Proxy, alive
from tests.support.rawhttp import Conn

DRAIN = 60.0  # an old generation that waited for its exchanges would stay this long


def big_sha(n: int) -> str:
    """What /big?n= sends: 64 KiB blocks of sha256(b"big") repeated."""
    block = hashlib.sha256(b"big").digest() * 2048
    h = hashlib.sha256()
    while n:
        h.update(block[:min(n, len(block))])
        n -= min(n, len(block))
    return h.hexdigest()


def dechunk(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while True:
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j], 16)
        i = j + 2
        if size == 0:
            return bytes(out)
        out += raw[i:i + size]
        i += size + 2


def read_chunked(c: Conn, on_progress: Callable[[int], None] = lambda n: None) -> bytes:
    """The rest of a chunked body whose head `c.response(head_only=True)` read: raw wire bytes
    until the last chunk (`on_progress(bytes so far)` after each read), de-chunked; what came
    after it stays in `c.buf` (pipelined responses)."""
    got = bytearray(c.buf)
    c.buf = b""
    while (end := got.find(b"\r\n0\r\n\r\n", max(0, len(got) - (1 << 16) - 8))) < 0:
        chunk = c.sock.recv(1 << 16)  # small reads: the proxy waits on us
        assert chunk, "the body was cut"
        got += chunk
        on_progress(len(got))
    c.buf = bytes(got[end + 7:])
    return dechunk(bytes(got[:end + 7]))


def upgrade_promptly(p: Proxy) -> float:
    """Upgrade; return how long the old generation took to exit after SIGUSR2."""
    t0 = time.monotonic()
    p.upgrade(timeout=DRAIN / 2)
    return time.monotonic() - t0


def test_a_256_mib_download_read_slowly_moves_across_5_upgrades() -> None:
    n = 256 << 20
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # read slowly
                c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
                status, headers, _ = c.response(head_only=True)
                assert status == 200 and headers.get("transfer-encoding") == "chunked"
                exits: list[float] = []

                def progress(k: int) -> None:
                    if len(exits) < 5 and k > (len(exits) + 1) * n // 6:
                        exits.append(upgrade_promptly(p))

                assert hashlib.sha256(read_chunked(c, progress)).hexdigest() == big_sha(n)
                assert len(exits) == 5
                assert max(exits) < DRAIN / 4, exits  # gone at once, not after drain_timeout
                assert c.get("/echo?after")[0] == 200  # the same connection serves on
            assert metric(p, "proxy_connections_accepted_total", listener="web") == 1
            assert metric(p, "proxy_handover_connections_total", mode="http_exchange") >= 5
            assert metric(p, "proxy_http_requests_total", listener="web") == 2
        finally:
            p.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_server_sent_events_read_by_curl_across_10_upgrades() -> None:
    events = 400
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            curl = subprocess.Popen(
                ["curl", "-sS", "-N", "--max-time", "120", f"http://127.0.0.1:{p.port}/sse?n={events}&ms=10"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            seen: list[int] = []
            lines: list[bytes] = []

            def read() -> None:
                assert curl.stdout is not None
                for line in curl.stdout:
                    lines.append(line)
                    if line.startswith(b"data: event "):
                        seen.append(int(line.split()[-1]))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            exits: list[float] = []
            try:
                for k in range(10):
                    deadline = time.monotonic() + 30
                    while len(seen) < (k + 1) * events // 12:
                        assert time.monotonic() < deadline and curl.poll() is None, lines[-5:]
                        time.sleep(0.005)
                    exits.append(upgrade_promptly(p))
                assert curl.wait(timeout=60) == 0, curl.stderr.read() if curl.stderr else ""
            finally:
                if curl.poll() is None:
                    curl.kill()
                    curl.wait()
                reader.join(timeout=10)
                for f in (curl.stdout, curl.stderr):
                    if f is not None:
                        f.close()
            assert seen == list(range(events))  # every event exactly once, in order
            assert max(exits) < DRAIN / 4, exits
            assert metric(p, "proxy_connections_accepted_total", listener="web") == 1
        finally:
            p.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upload_in_flight_moves_byte_exact(chunked: bool) -> None:
    size = 8 << 20
    payload = hashlib.sha256(b"up").digest() * (size // 32)
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                framing = (b"Transfer-Encoding: chunked" if chunked
                           else b"Content-Length: %d" % size)
                c.send(b"POST /up HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % framing)
                piece = size // 8
                for i in range(8):
                    data = payload[i * piece:(i + 1) * piece]
                    c.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    if i in (1, 3, 5):
                        upgrade_promptly(p)  # the body is half-way up
                if chunked:
                    c.send(b"0\r\n\r\n")
                status, _, body = c.response()
                assert status == 200
                assert json.loads(body) == {"bytes": size,
                                            "sha256": hashlib.sha256(payload).hexdigest()}
                assert c.get("/echo?after-upload")[0] == 200
        finally:
            p.stop()


def test_pipelined_requests_behind_a_streaming_response_move_with_it() -> None:
    n = 32 << 20
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n"
                       b"GET /echo?second HTTP/1.1\r\nHost: t\r\n\r\n"
                       b"GET /echo?third HTTP/1.1\r\nHost: t\r\n\r\n" % n)
                status, _, _ = c.response(head_only=True)
                assert status == 200
                upgraded: list[float] = []

                def progress(k: int) -> None:
                    if len(upgraded) < 2 and k > (len(upgraded) + 1) * n // 3:
                        upgraded.append(upgrade_promptly(p))

                assert hashlib.sha256(read_chunked(c, progress)).hexdigest() == big_sha(n)
                r2, r3 = c.response(), c.response()
                assert (r2[0], json.loads(r2[2])["path"]) == (200, "/echo?second")
                assert (r3[0], json.loads(r3[2])["path"]) == (200, "/echo?third")
                assert len(upgraded) == 2
        finally:
            p.stop()


def test_a_request_waiting_for_its_response_head_moves_too() -> None:
    """A slow upstream (the head comes after 6 s): the exchange moves while it waits, the
    next generation reads the head, and the old one does not wait for it."""
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                c.send(b"GET /slow?ms=6000 HTTP/1.1\r\nHost: t\r\n\r\n")
                deadline = time.monotonic() + 10
                while not any(path.startswith("/slow") for _, path, _ in be.requests):
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                old = p.pid()
                upgrade_promptly(p)
                new = p.pid()
                status, _, body = c.response()
                assert (status, json.loads(body)["path"]) == (200, "/slow?ms=6000")
                # The new generation finished it (it moved), the old one did not wait for it.
                p.wait_log(rf"event=access gen=\d+ pid={new} .*path=\"?/slow")  # (logged
                # just after the last byte went out)
                assert not p.find_log(rf"event=access gen=\d+ pid={old} .*path=\"?/slow")
                assert c.get("/echo?next")[0] == 200
            assert metric(p, "proxy_handover_connections_total", mode="http_exchange") == 1
            assert metric(p, "proxy_http_requests_total", listener="web", code="200") == 2
        finally:
            p.stop()


def test_a_download_sent_to_a_generation_that_dies_resumes_where_it_was() -> None:
    """The new generation crashes holding a batch it never ACKed, a download paused mid-body in
    it: the old generation resumes that exchange from its own state, serves again, and the
    client gets every byte."""
    n = 64 << 20
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
                assert c.response(head_only=True)[0] == 200
                old = p.pid()
                killed: list[bool] = []

                def progress(k: int) -> None:
                    if not killed and k > n // 3:
                        p.arm_fault("new:after_conns:crash")
                        os.kill(old, signal.SIGUSR2)
                        p.wait_log(rf"event=successor_lost gen=1 pid={old} ")
                        p.disarm_fault()
                        killed.append(True)

                assert hashlib.sha256(read_chunked(c, progress)).hexdigest() == big_sha(n)
                assert killed
                assert p.serving_pid() == old
                assert c.get("/echo?after")[0] == 200
            assert metric(p, "proxy_upgrades_total", result="failed") == 1
        finally:
            p.stop()


def test_a_response_that_ends_at_the_upstreams_close_moves_as_chunks() -> None:
    """No Content-Length, no chunking: the body ends when the upstream closes. h11 announces
    it chunked to an HTTP/1.1 client; the proxy frames each read as a chunk, so the exchange
    moves like any other and the client connection stays usable."""
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http", proxy={"drain_timeout": DRAIN})
        try:
            p.start()
            with Conn(p.port, timeout=30) as c:
                c.send(b"GET /slowbody?ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n")
                status, headers, _ = c.response(head_only=True)
                assert status == 200 and headers.get("transfer-encoding") == "chunked"
                old = p.pid()
                upgrade_promptly(p)  # the upstream is still sleeping before its second half
                assert not alive(old)
                assert read_chunked(c) == b"first half;second half"
                assert c.get("/echo?after")[0] == 200
            assert metric(p, "proxy_handover_connections_total", mode="http_exchange") == 1
        finally:
            p.stop()


def test_bad_chunked_framing_in_the_same_read_as_the_head_is_a_400_not_a_crash() -> None:
    """The body bytes that arrive with the head go through the framing tracker at once: a bad
    chunk size there is the client's error (400, counted once) and the proxy serves on."""
    with HttpBackend() as be:
        p = Proxy([be.addr], mode="http")
        try:
            p.start()
            with Conn(p.port) as c:
                c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                assert c.response()[0] == 400
            with Conn(p.port) as c:
                c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                c.send(b"zz\r\n")  # the same, in a read of its own
                assert c.response()[0] == 400
            with Conn(p.port) as c:
                assert c.get("/echo?still-serving")[0] == 200
            assert metric(p, "proxy_http_requests_total", listener="web", code="400") == 2
        finally:
            p.stop()
