"""The relay: byte-exact transfers, half-close, and pause/snapshot/resume at random points.

Real TCP sockets on 127.0.0.1: client app <-> [relay] <-> upstream app. A pause takes the
snapshot through the real takeover codec (encode, decode) and resumes it in a *fresh* Relay
built on dup'ed fds, as the next generation does after SCM_RIGHTS.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket

import pytest
import trio

from proxy.forward import Relay
from proxy.movable import PairSnapshot, State
from proxy.takeover import ConnRecord
from tests.test_takeover import conns_roundtrip


def tcp_pair(bufsize: int = 0) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback; `bufsize` shrinks both ends' kernel buffers so a slow
    reader makes the relay hold bytes (set before connect: window scaling is fixed then)."""
    lst = socket.socket()
    a = socket.socket()
    for s in (lst, a):
        if bufsize:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    a.connect(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def wire_roundtrip(snap: PairSnapshot, fds: tuple[int, ...]) -> tuple[PairSnapshot, int, int]:
    """Encode as a CONNS frame and decode it again, fds dup'ed as SCM_RIGHTS would."""
    rec = ConnRecord(7, "web", "tcp", "127.0.0.1:1", "127.0.0.1:2", snap)
    dup = [os.dup(fds[0]), os.dup(fds[1])]
    [(rec2, (cfd, ufd))] = conns_roundtrip([rec], dup)
    assert rec2.id == 7 and rec2.listener == "web"
    return rec2.state, cfd, ufd


async def send_all_then_shut(sock: trio.socket.SocketType, data: bytes, rng: random.Random,
                             shut: bool = True) -> None:
    view = memoryview(data)
    while view:
        n = min(len(view), rng.choice([1, 100, 4096, 65536, 300000]))
        sent = await sock.send(view[:n])
        view = view[sent:]
    if shut:
        sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: trio.socket.SocketType, rng: random.Random, slow: bool) -> bytes:
    out = bytearray()
    while True:
        chunk = await sock.recv(rng.choice([7, 1000, 65536]) if slow else 1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk
        if slow and rng.random() < 0.2:
            await trio.sleep(0.001)


async def relay_with_pauses(c2u: bytes, u2c: bytes, seed: int, pauses: int, splice: bool,
                            client_shuts_early: bool = False) -> list[PairSnapshot]:
    """Relay both payloads, pausing/resuming at random byte counts; returns the snapshots."""
    rng = random.Random(seed)
    snaps: list[PairSnapshot] = []
    capp, cside = tcp_pair(32768)
    uside, uapp = tcp_pair(32768)
    capp_t = trio.socket.from_stdlib_socket(capp)
    uapp_t = trio.socket.from_stdlib_socket(uapp)
    got: dict[str, bytes] = {}
    total = len(c2u) + len(u2c)
    thresholds = sorted(rng.randrange(0, max(1, total)) for _ in range(pauses))
    paused = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = Relay(cside, uside, splice=splice, spawn=nursery.start_soon)

            async def client() -> None:
                nursery.start_soon(send_all_then_shut, capp_t, c2u, rng)
                got["u2c"] = await read_to_eof(capp_t, rng, slow=not client_shuts_early)

            async def upstream_app() -> None:
                nursery.start_soon(send_all_then_shut, uapp_t, u2c, rng)
                got["c2u"] = await read_to_eof(uapp_t, rng, slow=True)

            nursery.start_soon(client)
            nursery.start_soon(upstream_app)
            nursery.start_soon(relay.run)
            for t in thresholds:
                while relay.state is State.NEW:  # its run() task has not started yet
                    await trio.sleep(0)
                while relay.c2u.moved + relay.u2c.moved < t and relay.state is State.RUNNING:
                    await trio.sleep(0)
                snap = await relay.pause()
                if snap is None:
                    break
                snaps.append(snap)
                state, cfd, ufd = wire_roundtrip(snap, relay.fds())
                relay.close()  # the old generation closes its copies after the ACK
                relay = Relay(socket.socket(fileno=cfd), socket.socket(fileno=ufd), state=state,
                              splice=splice, spawn=nursery.start_soon)
                nursery.start_soon(relay.run)
                paused += 1
    assert hashlib.sha256(got["c2u"]).hexdigest() == hashlib.sha256(c2u).hexdigest()
    assert hashlib.sha256(got["u2c"]).hexdigest() == hashlib.sha256(u2c).hexdigest()
    assert len(got["c2u"]) == len(c2u) and len(got["u2c"]) == len(u2c)
    assert relay.state is State.CLOSED
    capp.close()
    uapp.close()
    return snaps


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
async def test_byte_exact_both_ways_without_pauses(splice: bool) -> None:
    rng = random.Random(1)
    await relay_with_pauses(rng.randbytes(3_000_000), rng.randbytes(2_000_000), 1, 0, splice)


@pytest.mark.parametrize("seed", range(12))
async def test_pause_resume_at_random_points_large_transfers(seed: int) -> None:
    rng = random.Random(seed)
    c2u = rng.randbytes(rng.choice([0, 10, 200_000, 4_000_000]))
    u2c = rng.randbytes(rng.choice([0, 10, 200_000, 4_000_000]))
    await relay_with_pauses(c2u, u2c, seed, pauses=rng.randrange(1, 8), splice=seed % 3 != 0)


@pytest.mark.parametrize("seed", range(4))
async def test_pause_resume_half_closed(seed: int) -> None:
    """The client sends a little and shuts down at once; the upstream keeps streaming: most
    pauses land in the half-closed state (c2u at EOF, u2c busy)."""
    rng = random.Random(100 + seed)
    await relay_with_pauses(rng.randbytes(50), rng.randbytes(3_000_000), seed, pauses=5,
                            splice=True, client_shuts_early=True)


async def test_pauses_really_land_mid_transfer() -> None:
    """Guard for the two tests above: across seeds, pauses catch bytes held by the relay and
    half-closed pairs (otherwise those tests would prove little)."""
    snaps: list[PairSnapshot] = []
    for seed in range(6):
        rng = random.Random(seed)
        snaps += await relay_with_pauses(rng.randbytes(1_000_000), rng.randbytes(1_000_000),
                                         seed, pauses=4, splice=True)
        snaps += await relay_with_pauses(b"x", rng.randbytes(1_000_000), seed, pauses=3,
                                         splice=True, client_shuts_early=True)
    assert any(s.c2u.pending or s.u2c.pending for s in snaps)
    assert any(s.c2u.shut and not s.u2c.eof for s in snaps)


async def test_snapshot_keeps_bytes_parked_in_splice_pipe() -> None:
    """A reader that stops reading leaves bytes in the relay: in the pipe or `pending`.
    The snapshot must carry them; nothing is lost across the resume."""
    capp, cside = tcp_pair()
    uside, uapp = tcp_pair()
    payload = os.urandom(8 << 20)
    capp_t = trio.socket.from_stdlib_socket(capp)
    uapp_t = trio.socket.from_stdlib_socket(uapp)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            relay = Relay(cside, uside, splice=True, spawn=nursery.start_soon)
            nursery.start_soon(relay.run)
            nursery.start_soon(send_all_then_shut, capp_t, payload, random.Random(3))
            # Nobody reads upstream yet: kernel buffers and the relay fill up.
            while relay.c2u.moved == 0 or relay.c2u.in_pipe + len(relay.c2u.pending) == 0:
                await trio.sleep(0.01)
            snap = await relay.pause()
            assert snap is not None and len(snap.c2u.pending) > 0
            state, cfd, ufd = wire_roundtrip(snap, relay.fds())
            relay.close()
            relay2 = Relay(socket.socket(fileno=cfd), socket.socket(fileno=ufd), state=state,
                           spawn=nursery.start_soon)
            nursery.start_soon(relay2.run)
            got = await read_to_eof(uapp_t, random.Random(4), slow=False)
            uapp.shutdown(socket.SHUT_WR)
    assert got == payload
    capp.close()
    uapp.close()


async def test_error_on_one_side_closes_both() -> None:
    capp, cside = tcp_pair()
    uside, uapp = tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = Relay(cside, uside, spawn=nursery.start_soon)
            nursery.start_soon(relay.run)
            capp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            capp.close()  # RST
            uapp_t = trio.socket.from_stdlib_socket(uapp)
            data = await uapp_t.recv(10)
            assert data == b""
    assert relay.state is State.CLOSED
    uapp.close()


async def test_idle_timeout_closes_pair(autojump_clock: trio.testing.MockClock) -> None:
    capp, cside = tcp_pair()
    uside, uapp = tcp_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = Relay(cside, uside, idle_timeout=5.0, spawn=nursery.start_soon)
            async def sweeper() -> None:  # as the generation's Server.sweep_idle does
                while relay.state is not State.CLOSED:
                    relay.check_idle(trio.current_time())
                    await trio.sleep(1.0)

            nursery.start_soon(sweeper)
            capp.send(b"x")  # activity first: the clock starts at the last byte moved
            t0 = trio.current_time()
            assert await relay.run() is State.CLOSED
            assert 5.0 <= trio.current_time() - t0 <= 7.0
    assert relay.close_reason == "idle_timeout"
    capp.close()
    uapp.close()
