"""Host migration end to end (issue 11): real proxies in network namespaces, TCP_REPAIR.

Topology and helpers: tests/support/mignet.py. Every check that nothing was lost is the
clients' own: each echo line, http body and streamed chunk is compared with what was expected,
in order, and the client's and upstream's kernels must count no reset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mignet import (
    HOSTS,
    HTTP_PORT,
    MIG_PORT,
    SERVICE,
    SOURCE,
    TCP_PORT,
    NsProxy,
    Topology,
    read_line,
    result,
    stop_helper,
    unavailable,
)

pytestmark = pytest.mark.netns

STREAMS = 1000  # (each sends a line every ~0.5 s: 2,000 lines/s through the proxy)
HTTP_CLIENTS = 8


@pytest.fixture
def topo() -> Iterator[Topology]:
    why = unavailable()
    if why:
        pytest.skip(why)
    try:
        t = Topology()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"cannot build network namespaces here: {exc}")
    servers = t.spawn("up", "servers", HOSTS["up"])
    try:
        assert read_line(servers, 15) == "ready"
        yield t
    finally:
        stop_helper(servers)
        t.close()


def clients(topo: Topology, streams: int = STREAMS, http: int = HTTP_CLIENTS,
            stream: bool = True) -> subprocess.Popen[str]:
    args = ["clients", SERVICE, str(TCP_PORT), "--http-port", str(HTTP_PORT),
            "--streams", str(streams), "--http", str(http), "--pace", str(streams / 2000)]
    proc = topo.spawn("cl", *(args + (["--stream"] if stream else [])))
    assert read_line(proc, 30) == "ready"
    return proc


def resets(topo: Topology) -> tuple[int, ...]:
    c, u = topo.tcp_counters("cl"), topo.tcp_counters("up")
    return c["EstabResets"], c["OutRsts"], u["EstabResets"], u["OutRsts"]


def metrics_text(topo: Topology, p: NsProxy) -> str:
    """GET /metrics of a proxy, from inside its namespace."""
    m = p.wait_log(r"event=metrics_listening .*addr=(\S+)")
    return topo.run(p.host, sys.executable, "-c",
                    f"import urllib.request; print(urllib.request.urlopen("
                    f"'http://{m.group(1)}/metrics', timeout=5).read().decode())")


def move(src: NsProxy, dst_host: str) -> str:
    res = src.migrate(f"{HOSTS[dst_host]}:{MIG_PORT}")
    assert res.returncode == 0, f"{res.stderr}\nA log:\n{src.tail()}"
    src.wait_exit()
    return res.stdout


def test_migrate_there_and_back(topo: Topology) -> None:
    a = NsProxy(topo, "a").start()
    b = NsProxy(topo, "b").start()
    load = None
    a2 = None
    try:
        load = clients(topo)
        time.sleep(1.0)  # every stream has sent a line or two
        before = resets(topo)
        out = move(a, "b")
        assert out.startswith("migrated: "), out
        n = int(out.split()[1])
        assert n >= STREAMS + HTTP_CLIENTS + 2, out  # (+ the streaming response, the tunnel)
        assert topo.has_address("b", SERVICE) and topo.has_address("b", SOURCE)
        assert not topo.has_address("a", SERVICE)
        b.wait_log(r"event=migration_phase .*phase=live")
        text = metrics_text(topo, b)
        assert 'proxy_migrations_total{result="success"} 1.0' in text
        assert f"proxy_migrated_connections_total {float(n)}" in text
        # and back, to a fresh proxy on A
        a2 = NsProxy(topo, "a").start()
        out = move(b, "a")
        assert int(out.split()[1]) == n, out
        assert topo.has_address("a", SERVICE) and not topo.has_address("b", SERVICE)
        after = resets(topo)  # (before the clients stop: closing with unread bytes sends RST)
        got = result(load)
        assert got["nerrors"] == 0, got
        assert got["chunks"] > 0 and got["requests"] > 0 and got["lines"] > STREAMS
        assert got["tunnels"] == 1
        assert after == before, "client/upstream EstabResets, OutRsts changed"
    finally:
        if load is not None:
            stop_helper(load)
        for p in (a, b, a2):
            if p is not None:
                p.stop()


def test_upgrade_after_migration_and_migration_after_upgrade(topo: Topology) -> None:
    """A -> B, a hot upgrade of B at once (the migrated connections and the migration sockets
    go to B's next generation), then B's new generation migrates everything back to A."""
    a = NsProxy(topo, "a").start()
    b = NsProxy(topo, "b").start()
    load = None
    a2 = None
    try:
        load = clients(topo, streams=50, http=4)
        before = resets(topo)
        n = int(move(a, "b").split()[1])
        b.wait_log(r"event=migration_phase .*phase=live")
        b.upgrade()
        a2 = NsProxy(topo, "a").start()
        assert int(move(b, "a").split()[1]) == n
        after = resets(topo)
        got = result(load)
        assert got["nerrors"] == 0, got
        assert after == before
    finally:
        if load is not None:
            stop_helper(load)
        for p in (a, b, a2):
            if p is not None:
                p.stop()


def test_failures_change_nothing(topo: Topology) -> None:
    """B refuses the key, B is not reachable, garbage on B's migration port, and B dies before
    its first ACK: every time `migrate` exits 1 with the reason and A still serves everything
    (the clients check every byte); B keeps serving through the garbage."""
    a = NsProxy(topo, "a").start()
    b: NsProxy | None = NsProxy(topo, "b", key=b"x" * 40).start()  # another key
    load = None
    b2 = None
    try:
        load = clients(topo, streams=30, http=2)
        before = resets(topo)
        res = a.migrate(f"{HOSTS['b']}:{MIG_PORT}")
        assert res.returncode == 1 and "does not hold the migration key" in res.stderr, res.stderr
        assert b is not None
        b.wait_log(r"event=migration_peer_refused ")  # (A saw B's proof fail first and hung up)
        res = a.migrate(f"{HOSTS['b']}:{MIG_PORT + 1}")  # nothing listens there
        assert res.returncode == 1 and "cannot reach" in res.stderr, res.stderr
        topo.run("a", sys.executable, "-c", GARBAGE % (HOSTS["b"], MIG_PORT))
        assert b is not None
        b.wait_log(r"event=migration_peer_refused .*bad magic")
        b.stop()
        b = None
        b2 = NsProxy(topo, "b").start()
        b2.arm_fault("migrate_in:before_ack:crash")
        res = a.migrate(f"{HOSTS['b']}:{MIG_PORT}")
        assert res.returncode == 1, res.stderr
        a.wait_log(r"event=migration_phase .*phase=rolled_back")
        assert topo.has_address("a", SERVICE) and not topo.has_address("b", SERVICE)
        time.sleep(0.5)  # the clients keep going through A
        after = resets(topo)
        got = result(load)
        assert got["nerrors"] == 0, got
        assert after == before
        assert a.serving_pid() is not None
        assert a.count(r"event=migration_failed") == 3
    finally:
        if load is not None:
            stop_helper(load)
        for p in (a, b, b2):
            if p is not None:
                p.stop()


LATE_CLIENT = """
import socket, sys
s = socket.create_connection(("%s", %d), timeout=20)
s.sendall(b"late line\\n")
got = b""
s.settimeout(20)
while not got.endswith(b"\\n"):
    chunk = s.recv(100)
    if not chunk:
        break
    got += chunk
print(got.decode().strip())
"""


def test_a_connection_waiting_in_the_backlog_at_the_freeze_moves_too(topo: Topology) -> None:
    """A client that connects after A stopped accepting (it waits in A's listen backlog) is
    moved with the rest and served by B: no connection is lost to the migration."""
    a = NsProxy(topo, "a").start()
    b = NsProxy(topo, "b").start()
    late = None
    try:
        a.arm_fault("migrate_out:before_freeze:delay")  # A stops accepting, then waits 1.5 s
        mig = subprocess.Popen(
            ["ip", "netns", "exec", topo.ns["a"], sys.executable, "-m", "proxy", "migrate",
             "--config", str(a.config), "--to", f"{HOSTS['b']}:{MIG_PORT}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=a.env, cwd=a.dir)
        a.wait_log(r"event=test_fault .*step=before_freeze")
        late = subprocess.Popen(["ip", "netns", "exec", topo.ns["cl"], sys.executable, "-c",
                                 LATE_CLIENT % (SERVICE, TCP_PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = mig.communicate(timeout=60)
        assert mig.returncode == 0, f"{err}\nA log:\n{a.tail()}"
        assert out.startswith("migrated: 1 connections"), out  # the late one, nothing else
        got, err = late.communicate(timeout=30)
        assert got.strip() == "late line", err
        b.wait_log(r"event=migration_phase .*phase=live .*resumed=1")
        a.wait_exit()
    finally:
        if late is not None and late.poll() is None:
            late.kill()
        for p in (a, b):
            p.stop()


GARBAGE = """
import socket
s = socket.create_connection(("%s", %d), timeout=5)
s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n" * 10)
s.settimeout(5)
try:
    s.recv(100)
except OSError:
    pass
"""


def test_migrate_without_migration_section_fails_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[[listener]]\nname = "web"\nlisten = "127.0.0.1:0"\nupstream = "app"\n'
                   '[upstream.app]\nservers = ["127.0.0.1:9"]\n')
    res = subprocess.run([sys.executable, "-m", "proxy", "migrate", "--config", str(cfg),
                          "--to", "127.0.0.1:7070"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "no [migration] section" in res.stderr


def test_migrate_without_capabilities_fails_at_once(topo: Topology) -> None:
    """A proxy without CAP_NET_ADMIN and CAP_NET_RAW refuses at once, saying so; it serves on."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop capabilities")
    drop = ("setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw",
            "--")
    a = NsProxy(topo, "a", prefix=drop).start()
    try:
        res = a.migrate(f"{HOSTS['b']}:{MIG_PORT}", timeout=20)
        assert res.returncode == 1, res.stderr
        assert "missing capabilities CAP_NET_ADMIN and CAP_NET_RAW" in res.stderr, res.stderr
        assert a.serving_pid() is not None and topo.has_address("a", SERVICE)
    finally:
        a.stop()
