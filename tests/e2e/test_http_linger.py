"""Lingering close end to end: an error answered before the request was read whole reaches a
client that writes its whole request before reading, even with both cores busy; the lingering
is bounded by lingering_time and lingering_timeout."""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from tests.e2e.test_http import http_proxy
from tests.e2e.test_tcp import wait_metric
from tests.support.backends import dead_port

BODY = os.urandom(10 << 20)
PIECE = b"a" * (64 << 10)


@contextmanager
def cpu_hogs(n: int = 2) -> Iterator[None]:
    """Keep `n` cores busy with spinning processes (killed by pid on the way out)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for h in hogs:
            os.kill(h.pid, signal.SIGKILL)
            h.wait(timeout=10)


def status_line(sock: socket.socket) -> str:
    """The status code of the first response line, or what went wrong reading it."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return f"EOF after {buf[:40]!r}"
        buf += chunk
    return buf.split(b" ", 2)[1].decode()


def post_10mib(port: int) -> str:
    """Python's http.client: the whole request written, then the response read."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", "/upload", body=BODY)
        return str(c.getresponse().status)
    except OSError as exc:
        return type(exc).__name__
    finally:
        c.close()


def header_1mib(port: int) -> str:
    """A 1 MiB header written in 64 KiB pieces, then the response read."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
            for _ in range(16):
                s.sendall(PIECE)
            s.sendall(b"\r\n\r\n")
            return status_line(s)
    except OSError as exc:
        return type(exc).__name__


def header_200k(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
            return status_line(s)
    except OSError as exc:
        return type(exc).__name__


def test_every_early_error_is_read_while_both_cores_are_busy() -> None:
    with http_proxy([f"127.0.0.1:{dead_port()}"]) as p, cpu_hogs(), \
            ThreadPoolExecutor(16) as pool:
        posts = pool.map(post_10mib, [p.port] * 100)
        heads = pool.map(header_1mib, [p.port] * 100)
        assert Counter(posts) == {"502": 100}
        assert Counter(heads) == {"431": 100}
        # Each client ended the linger itself (eof or reset, logged at debug): none was cut.
        assert p.count(r"event=lingered .*reason=(time|timeout|bytes)") == 0


def test_431_for_a_200k_head_is_always_read() -> None:
    with http_proxy(["127.0.0.1:1"]) as p, cpu_hogs(), ThreadPoolExecutor(8) as pool:
        assert Counter(pool.map(header_200k, [p.port] * 50)) == {"431": 50}


def _lingered(p_text: str, reason: str) -> float:
    m = re.search(rf"event=lingered .*reason={reason} .*ms=([\d.]+)", p_text)
    assert m, f"no lingered reason={reason}"
    return float(m.group(1))


def test_lingering_is_cut_after_lingering_time_and_lingering_timeout() -> None:
    linger = {"lingering_time": 2.0, "lingering_timeout": 0.5}
    with http_proxy([f"127.0.0.1:{dead_port()}"], listener=linger) as p:
        # A client that never stops sending (a slow uploader, 16 KiB every 20 ms: well under
        # the 64 MiB cap) reads its 502 at once and is cut lingering_time later.
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
            t_status = 0.0
            status = ""
            error = ""
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                try:
                    s.sendall(b"x" * 16384)
                    if not status and select.select([s], [], [], 0)[0]:
                        status, t_status = status_line(s), time.monotonic()
                except OSError as exc:
                    error = type(exc).__name__
                    break
                time.sleep(0.02)
            t_cut = time.monotonic()
        assert status == "502"
        assert error in ("ConnectionResetError", "BrokenPipeError"), error
        assert 1.5 <= t_cut - t_status <= 4.0, t_cut - t_status
        p.wait_log(r"event=lingered .*reason=time")
        assert 2000 <= _lingered(p.text(), "time") < 3000

        # One that stops sending without closing is let go after lingering_timeout. Our FIN
        # follows the answer at once; the close is the proxy's alone, so its log says when.
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
                      + b"x" * 1000)
            assert status_line(s) == "502"
            while s.recv(4096):  # the rest of the answer, then EOF (not a reset)
                pass
            p.wait_log(r"event=lingered .*reason=timeout")
            assert 500 <= _lingered(p.text(), "timeout") < 1500
            wait_metric(p, "proxy_connections_active", 0, listener="web")


def test_a_lingering_client_holds_an_old_generation_at_most_lingering_time() -> None:
    with http_proxy([f"127.0.0.1:{dead_port()}"], listener={"lingering_time": 2.0}) as p, \
            socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        old = p.pid()
        s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
        s.sendall(b"x" * 16384)
        assert status_line(s) == "502"
        t0 = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        error = ""
        while time.monotonic() - t0 < 15 and not error:
            try:  # the client keeps sending: the old generation still lingers on it
                s.sendall(b"x" * 16384)
            except OSError as exc:
                error = type(exc).__name__
            time.sleep(0.02)
        assert error, "never cut"
        p.wait_log(rf"event=lingered gen=1 pid={old} .*reason=time")
        p.wait_log(rf"event=exit gen=1 pid={old}")
        assert time.monotonic() - t0 < 5.0


def test_503_above_max_connections_is_read_by_a_10mib_post() -> None:
    only_one = {"max_connections": 1, "header_timeout": 30.0}
    with http_proxy([f"127.0.0.1:{dead_port()}"], listener=only_one) as p, \
            socket.create_connection(("127.0.0.1", p.port), timeout=10) as first:
        first.sendall(b"GET / HTTP/1.1\r\nHo")  # holds the one slot: a head still coming
        wait_metric(p, "proxy_connections_active", 1, listener="web")
        assert [post_10mib(p.port) for _ in range(5)] == ["503"] * 5
