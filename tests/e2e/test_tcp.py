"""tcp mode end to end: the real proxy process, real backends and clients on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import sockinspect
from tests.support.backends import Backend, Blackhole, dead_port, echo, named_echo
from tests.support.proc import Proxy, alive, running


def connect(p: Proxy, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=timeout)


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 20, n - len(out)))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def recv_to_eof(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 20):
        out += chunk
    return bytes(out)


def metric(p: Proxy, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10).read()
    total = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_metric(p: Proxy, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (got := metric(p, name, **labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} stays {got}, expected {value}"
        time.sleep(0.01)


def echo_roundtrip(p: Proxy, payload: bytes) -> bytes:
    with connect(p, timeout=30) as s:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_to_eof(s)))
        reader.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reader.join(timeout=60)
        assert not reader.is_alive()
        return got[0]


def test_byte_exact_concurrent_transfers() -> None:
    with Backend(echo) as be, running([be.addr]) as p:
        payloads = [random.Random(i).randbytes(random.Random(i).choice([1, 1000, 2_000_000]))
                    for i in range(24)]
        results: dict[int, bytes] = {}

        def worker(i: int) -> None:
            results[i] = echo_roundtrip(p, payloads[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, data in enumerate(payloads):
            assert hashlib.sha256(results[i]).digest() == hashlib.sha256(data).digest(), i
        total = sum(len(x) for x in payloads)
        assert metric(p, "proxy_bytes_total", direction="client_to_upstream") == total
        assert metric(p, "proxy_bytes_total", direction="upstream_to_client") == total
        assert metric(p, "proxy_connections_accepted_total", listener="web") == len(payloads)


def test_half_close_client_to_upstream() -> None:
    def answer_after_eof(conn: socket.socket, be: Backend) -> None:
        data = recv_to_eof(conn)
        conn.sendall(b"got:" + data)

    with Backend(answer_after_eof) as be, running([be.addr]) as p, connect(p) as s:
        s.sendall(b"question")
        s.shutdown(socket.SHUT_WR)
        assert recv_to_eof(s) == b"got:question"


def test_half_close_upstream_to_client() -> None:
    done = threading.Event()

    def banner_then_listen(conn: socket.socket, be: Backend) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        be.data["late"] = recv_to_eof(conn)
        done.set()

    with Backend(banner_then_listen) as be, running([be.addr]) as p, connect(p) as s:
        assert recv_to_eof(s) == b"banner"
        s.sendall(b"still talking after your EOF")
        s.shutdown(socket.SHUT_WR)
        assert done.wait(10)
        assert be.data["late"] == b"still talking after your EOF"


def test_failover_past_a_dead_server() -> None:
    dead = f"127.0.0.1:{dead_port()}"
    with Backend(named_echo, name="alive") as be, running([dead, be.addr]) as p:
        for _ in range(6):
            with connect(p) as s:
                assert s.recv(6) == b"alive\n"
        failures = metric(p, "proxy_upstream_connect_failures_total", upstream="app", server=dead)
        assert 1 <= failures <= 3  # max_fails=3 marks it down; then it is skipped
        assert p.count(r"event=upstream_connect_failed .*marked_down=True") >= 1


def test_all_servers_dead_closes_client_within_connect_timeout() -> None:
    hole = Blackhole()
    try:
        with running([hole.addr, f"127.0.0.1:{dead_port()}"],
                     upstream={"connect_timeout": 0.5}) as p, connect(p) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b""
            elapsed = time.monotonic() - t0
            assert elapsed < 0.5 + 2.0, elapsed  # one timeout + one refusal, then closed
            p.wait_log(r"event=no_upstream ")
            assert metric(p, "proxy_upstream_connect_failures_total", server=hole.addr) == 1
    finally:
        hole.close()


def test_round_robin_alternates() -> None:
    with Backend(named_echo, name="a") as a, Backend(named_echo, name="b") as b, \
            running([a.addr, b.addr]) as p:
        seen = []
        for _ in range(6):
            with connect(p) as s:
                seen.append(s.recv(2))
        assert seen == [b"a\n", b"b\n"] * 3


def test_least_conn_avoids_the_busy_server() -> None:
    with Backend(named_echo, name="a") as a, Backend(named_echo, name="b") as b, \
            running([a.addr, b.addr], upstream={"balance": "least_conn"}) as p, \
            connect(p) as held:
        busy = held.recv(2)
        other = b"b\n" if busy == b"a\n" else b"a\n"
        for _ in range(4):  # round robin would give the busy one every other time
            with connect(p) as s:
                assert s.recv(2) == other
            wait_metric(p, "proxy_connections_active", 1.0, listener="web")


def test_socket_options_on_both_sockets_of_a_pair() -> None:
    with Backend(echo) as be, running(
            [be.addr],
            listener={"keepalive": {"idle": 7.0, "interval": 3.0, "count": 4},
                      "user_timeout": 9.0, "nodelay": True},
            upstream={"keepalive": {"idle": 11.0, "interval": 5.0, "count": 2},
                      "nodelay": False}) as p, connect(p) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        try:
            client_side = sockinspect.find(p.pid(), peer=s.getsockname()[:2])
        except PermissionError as exc:
            pytest.skip(f"cannot inspect the proxy's sockets (pidfd_getfd): {exc}")
        up_side = sockinspect.find(p.pid(), peer=("127.0.0.1", be.port))
        tcp = socket.IPPROTO_TCP
        with client_side, up_side:
            assert client_side.getsockopt(tcp, socket.TCP_NODELAY) == 1
            assert client_side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert [client_side.getsockopt(tcp, o) for o in
                    (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [7, 3, 4]
            assert client_side.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 9000
            assert up_side.getsockopt(tcp, socket.TCP_NODELAY) == 0
            assert [up_side.getsockopt(tcp, o) for o in
                    (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [11, 5, 2]


def test_idle_timeout_closes_quiet_pairs() -> None:
    with Backend(echo) as be, running([be.addr], listener={"idle_timeout": 0.3}) as p, \
            connect(p) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert s.recv(1) == b""  # closed by the proxy after a quiet spell (bounded by timeout)


def test_max_connections_pauses_accepting_and_resumes() -> None:
    with Backend(named_echo, name="x") as be, running(
            [be.addr], listener={"max_connections": 2}) as p:
        a, b = connect(p), connect(p)
        assert a.recv(2) == b"x\n" and b.recv(2) == b"x\n"
        c = connect(p, timeout=0.5)  # queued in the backlog, not served
        with pytest.raises(TimeoutError):
            c.recv(2)
        p.wait_log(r"event=max_connections ")
        a.close()
        c.settimeout(10)
        assert c.recv(2) == b"x\n"
        for x in (b, c):
            x.close()


def test_graceful_stop_finishes_transfer_in_flight() -> None:
    with Backend(echo) as be:
        p = Proxy([be.addr], proxy={"drain_timeout": 20.0})
        try:
            p.start()
            pid = p.pid()
            s = connect(p)
            s.sendall(b"a" * 1000)
            assert recv_exact(s, 1000) == b"a" * 1000
            os.kill(pid, signal.SIGTERM)
            p.wait_log(r"event=stop_requested ")
            p.wait_log(r"event=phase .*phase=draining")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", p.port), timeout=5)
            for i in range(20):  # the transfer in flight carries on
                s.sendall(bytes([i]) * 50_000)
                assert recv_exact(s, 50_000) == bytes([i]) * 50_000
            assert alive(pid)
            s.shutdown(socket.SHUT_WR)
            assert recv_to_eof(s) == b""
            s.close()
            assert p.proc is not None
            assert p.proc.wait(timeout=15) == 0
            assert "event=stopped gen=1" in p.text() and "drained=True" in p.text()
            assert not p.pidfile.exists()
        finally:
            p.stop()


@contextmanager
def netns_backend() -> Iterator[tuple[str, str]]:
    """An echo backend in a network namespace of our own behind a veth pair.
    Yields (backend address, namespace name); skips when the machine cannot do it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for ip netns")
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"pxt{tag}", f"pxa{tag}", f"pxb{tag}"
    octet = random.Random(tag).randrange(1, 250)
    a, b = f"10.231.{octet}.1", f"10.231.{octet}.2"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns],
             ["ip", "addr", "add", f"{a}/30", "dev", here], ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{b}/30", "dev", there],
             ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"]]
    server = None
    try:
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if res.returncode != 0:
                pytest.skip(f"ip netns unavailable here: {' '.join(cmd)}: {res.stderr.strip()}")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "socat", f"TCP-LISTEN:7777,bind={b},fork,reuseaddr",
             "EXEC:cat"] if shutil.which("socat") else
            ["ip", "netns", "exec", ns, "python3", "-c",
             "import socket,threading\n"
             f"s=socket.create_server(('{b}',7777))\n"
             "def h(c):\n"
             "  while d:=c.recv(65536): c.sendall(d)\n"
             "while True: threading.Thread(target=h,args=(s.accept()[0],)).start()"],
            start_new_session=True)  # its own process group: socat forks a child per client
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((b, 7777), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"{b}:7777", ns
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # the server and every child it forked
            server.wait(timeout=5)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)


@pytest.mark.netns
def test_keepalive_finds_a_dead_upstream() -> None:
    with netns_backend() as (addr, ns), running(
            [addr], upstream={"keepalive": {"idle": 1.0, "interval": 1.0, "count": 2}}) as p, \
            connect(p, timeout=20) as s:
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
        # The upstream host vanishes without a FIN or RST: only keepalive can tell.
        iface = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link", "show", "type",
                                "veth"], capture_output=True, text=True, check=True, timeout=10)
        name = iface.stdout.split(":")[1].strip().split("@")[0]
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", name, "down"],
                       check=True, timeout=10)
        t0 = time.monotonic()
        assert s.recv(10) == b""  # the proxy closed the client once keepalive gave up
        assert time.monotonic() - t0 < 15
        p.wait_log(r"event=conn_closed .*reason=u2c:ETIMEDOUT|reason=c2u:ETIMEDOUT", timeout=5)


def test_fd_exhaustion_on_accept_backs_off_and_recovers() -> None:
    """EMFILE on accept: the proxy logs, backs off and keeps serving; the client waiting in the
    backlog is served as soon as a descriptor frees up."""
    import resource

    with Backend(echo) as be, running([be.addr], listener={"splice": False}) as p:
        pid = p.pid()

        def fds_open() -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        baseline = fds_open()
        with connect(p) as warm:  # a first pair, so anything opened lazily exists now
            warm.sendall(b"w")
            assert warm.recv(1) == b"w"
        # Wait (bounded) for that pair's two fds to be closed again; no scrape meanwhile, as
        # the metrics endpoint's own connection would be counted too.
        deadline = time.monotonic() + 10
        while fds_open() > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        in_use = fds_open()
        k = 4
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2 * k, in_use + 2 * k))
        except (PermissionError, ValueError) as exc:
            pytest.skip(f"cannot set the proxy's fd limit: {exc}")
        held = [connect(p) for _ in range(k)]
        for i, s in enumerate(held):
            s.sendall(b"%d" % i)
            assert s.recv(1) == b"%d" % i
        extra = connect(p)  # completes in the backlog; accept() now fails with EMFILE
        p.wait_log(r"event=accept_backoff .*errno=EMFILE")
        for s in held:  # the connections it holds carry on
            s.sendall(b"again")
            assert recv_exact(s, 5) == b"again"
        held.pop().close()
        extra.sendall(b"served")
        assert recv_exact(extra, 6) == b"served"
        for s in [*held, extra]:
            s.close()
        assert alive(pid)
