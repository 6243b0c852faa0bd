"""Host migration end to end (issue 11): real proxies in network namespaces, TCP_REPAIR.

Topology and helpers: tests/support/mignet.py. Every check that nothing was lost is the
clients' own: each echo line, http body and streamed chunk is compared with what was expected,
in order, and the client's and upstream's kernels must count no reset.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

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

STREAMS = 200
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
            "--streams", str(streams), "--http", str(http)]
    proc = topo.spawn("cl", *(args + (["--stream"] if stream else [])))
    assert read_line(proc, 30) == "ready"
    return proc


def resets(topo: Topology) -> tuple[int, ...]:
    c, u = topo.tcp_counters("cl"), topo.tcp_counters("up")
    return c["EstabResets"], c["OutRsts"], u["EstabResets"], u["OutRsts"]


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
        before = resets(topo)
        out = move(a, "b")
        assert out.startswith("migrated: "), out
        n = int(out.split()[1])
        assert n >= STREAMS + HTTP_CLIENTS + 1, out
        assert topo.has_address("b", SERVICE) and topo.has_address("b", SOURCE)
        assert not topo.has_address("a", SERVICE)
        b.wait_log(r"event=migration_phase .*phase=live")
        # and back, to a fresh proxy on A
        a2 = NsProxy(topo, "a").start()
        out = move(b, "a")
        assert int(out.split()[1]) == n, out
        assert topo.has_address("a", SERVICE) and not topo.has_address("b", SERVICE)
        after = resets(topo)  # (before the clients stop: closing with unread bytes sends RST)
        got = result(load)
        assert got["nerrors"] == 0, got
        assert got["chunks"] > 0 and got["requests"] > 0 and got["lines"] > STREAMS
        assert after == before, "client/upstream EstabResets, OutRsts changed"
    finally:
        if load is not None:
            stop_helper(load)
        for p in (a, b, a2):
            if p is not None:
                p.stop()
