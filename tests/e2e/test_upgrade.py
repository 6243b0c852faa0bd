"""Hot upgrade end to end: real processes, SIGUSR2, streams that must never skip a byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from proxy import __version__
from proxy.frames import encode
from proxy.takeover import MsgType
from tests.e2e.test_tcp import metric
from tests.support.backends import Backend, echo
from tests.support.load import SeqStream, ShortConns, StreamSet, start_echo, wait_until
from tests.support.proc import ROOT, Proxy, alive


@asynccontextmanager
async def deployment(nursery: trio.Nursery, port: int | None = None,
                     **kwargs: object) -> AsyncIterator[Proxy]:
    if port is None:
        port = await start_echo(nursery)
    p = Proxy([f"127.0.0.1:{port}"], **kwargs)  # type: ignore[arg-type]
    try:
        await trio.to_thread.run_sync(p.start)
        yield p
    finally:
        # In a thread, so the in-test backends keep running while the proxy drains (stopping
        # on this thread would freeze them and the drain would wait out drain_timeout).
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(p.stop)


async def upgrade(p: Proxy) -> int:
    return await trio.to_thread.run_sync(p.upgrade)


def streams_progress(streams: list[SeqStream]) -> Callable[[], bool]:
    mark = [s.replies for s in streams]
    return lambda: all(s.replies > m for s, m in zip(streams, mark, strict=True))


def assert_clean(streams: list[SeqStream]) -> None:
    errors = [s.error for s in streams if s.error]
    assert not errors, errors[:5]


async def test_twenty_upgrades_under_load_lose_nothing() -> None:
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 50).start(nursery)
            streams = ss.streams
            shorts = ShortConns(p.port)
            nursery.start_soon(shorts.run, ss.stop)
            await wait_until(streams_progress(streams))
            pids = [p.pid()]
            for _ in range(20):
                new = await upgrade(p)
                assert not alive(pids[-1])  # the old generation is gone...
                assert all(s.open for s in streams), [s.error for s in streams if s.error]
                pids.append(new)
                await wait_until(streams_progress(streams))  # ...and every stream moves on
            moved = metric(p, "proxy_handover_connections_total", mode="tcp")
            generation = metric(p, "proxy_generation")
            upgrades = metric(p, "proxy_upgrades_total", result="success")
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(streams)
    assert not shorts.failures, shorts.failures[:5]
    assert shorts.ok > 20
    assert len(set(pids)) == 21
    assert generation == 21 and upgrades == 20
    assert moved >= 50 * 20
    assert min(s.seq for s in streams) > 0


async def test_bytes_queued_in_the_kernel_during_handover_arrive() -> None:
    """Both directions carry 16 MiB into a slow reader; upgrades land mid-transfer, while the
    relay and the kernel hold unsent bytes."""
    size = 16 << 20
    payload = hashlib.sha256(b"seed").digest() * (size // 32)
    got_up = hashlib.sha256()
    done_up = trio.Event()

    async def sink_then_source(stream: trio.SocketStream) -> None:
        async with stream:
            n = 0
            while chunk := await stream.receive_some(4096):  # slow: small reads, yields
                got_up.update(chunk)
                n += len(chunk)
                await trio.sleep(0)
            done_up.set()
            await stream.send_all(payload)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, sink_then_source, 0, host="127.0.0.1"))
            async with deployment(nursery, listeners[0].socket.getsockname()[1]) as p:
                stream = await trio.open_tcp_stream("127.0.0.1", p.port)
                sent = 0

                async def send() -> None:
                    nonlocal sent
                    for i in range(0, size, 1 << 16):
                        await stream.send_all(payload[i:i + (1 << 16)])
                        sent += 1 << 16
                    await stream.send_eof()

                nursery.start_soon(send)
                await wait_until(lambda: sent >= size // 4)
                await upgrade(p)
                await done_up.wait()
                down = hashlib.sha256()
                n = 0
                upgraded_down = False
                while chunk := await stream.receive_some(8192):
                    down.update(chunk)
                    n += len(chunk)
                    if n >= size // 4 and not upgraded_down:
                        upgraded_down = True
                        await upgrade(p)  # we stop reading meanwhile: the pair is full
                await stream.aclose()
                nursery.cancel_scope.cancel()
    assert got_up.digest() == hashlib.sha256(payload).digest()
    assert n == size and down.digest() == hashlib.sha256(payload).digest()


async def test_half_closed_pairs_survive() -> None:
    release = trio.Event()
    got_eof = trio.Event()
    late: list[bytes] = []

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            first = await stream.receive_some(100)
            if first == b"question":  # pair 1: the client half-closes, we answer later
                while await stream.receive_some(100):
                    pass
                got_eof.set()
                await release.wait()
                await stream.send_all(b"answer")
            else:  # pair 2: we half-close first, the client talks on
                await stream.send_all(b"banner")
                await stream.send_eof()
                data = first
                while chunk := await stream.receive_some(100):
                    data += chunk
                late.append(data)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, backend, 0, host="127.0.0.1"))
            async with deployment(nursery, listeners[0].socket.getsockname()[1]) as p:
                a = await trio.open_tcp_stream("127.0.0.1", p.port)
                await a.send_all(b"question")
                await a.send_eof()
                await got_eof.wait()
                b = await trio.open_tcp_stream("127.0.0.1", p.port)
                await b.send_all(b"hello")
                assert await b.receive_some(100) == b"banner"
                assert await b.receive_some(100) == b""
                await upgrade(p)
                await upgrade(p)
                release.set()
                assert await a.receive_some(100) == b"answer"
                assert await a.receive_some(100) == b""
                await b.send_all(b" after two upgrades")
                await b.send_eof()
                await wait_until(lambda: bool(late))
                await a.aclose()
                await b.aclose()
                nursery.cancel_scope.cancel()
    assert late == [b"hello after two upgrades"]


def break_config(p: Proxy) -> None:
    p.write_config(p.config.read_text() + "\n[bogus]\n")


def broken_code(p: Proxy) -> None:
    """New code on disk that cannot import: `python -m proxy` in the proxy's cwd finds it."""
    (p.dir / "proxy").mkdir()
    (p.dir / "proxy" / "__init__.py").write_text('raise ImportError("broken build on disk")\n')


ROLLBACKS: list[tuple[str, str, str, dict[str, float]]] = [
    ("new:start:exit", "", r"exited with status 1", {}),
    ("new:before_ready:crash", "", r"exited with status 3", {}),
    ("new:before_ready:hang", "", r"not serving within upgrade_timeout=2.0s", {"upgrade_timeout": 2.0}),
    ("", "bad_config", r"exited with status 2", {}),
    ("", "broken_code", r"exited with status 1", {}),
]


@pytest.mark.parametrize(("fault", "change", "reason", "proxy_cfg"), ROLLBACKS,
                         ids=[f or c for f, c, _, _ in ROLLBACKS])
async def test_failed_upgrade_changes_nothing(fault: str, change: str, reason: str,
                                              proxy_cfg: dict[str, float]) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery, proxy=proxy_cfg) as p:
            ss = StreamSet(p.port, 10).start(nursery)
            streams = ss.streams
            shorts = ShortConns(p.port)
            nursery.start_soon(shorts.run, ss.stop)
            await wait_until(streams_progress(streams))
            old = p.pid()
            good_config = p.config.read_text()
            if fault:
                p.arm_fault(fault)
            if change == "bad_config":
                break_config(p)
            if change == "broken_code":
                broken_code(p)
            m = await trio.to_thread.run_sync(p.signal_upgrade_expect_failure)
            assert p.find_log(reason, m.start()), m.group(0)
            if change:
                assert "child_stderr_tail=" in m.group(0)
            assert p.pid() == old
            await wait_until(streams_progress(streams))
            assert metric(p, "proxy_upgrades_total", result="failed") == 1
            assert metric(p, "proxy_generation") == 1
            # Fixed: the next upgrade goes through, the streams still don't notice.
            p.disarm_fault()
            p.write_config(good_config)
            shutil.rmtree(p.dir / "proxy", ignore_errors=True)
            new = await upgrade(p)
            assert new != old and not alive(old)
            await wait_until(streams_progress(streams))
            assert metric(p, "proxy_upgrades_total", result="failed") == 1
            assert metric(p, "proxy_upgrades_total", result="success") == 1
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(streams)
    assert not shorts.failures, shorts.failures[:5]


def _runnable_by_nobody(path: str) -> bool:
    try:
        return subprocess.run([path, "-c", "pass"], user=65534, timeout=30,
                              capture_output=True).returncode == 0
    except OSError:
        return False


def hello_frame() -> bytes:
    return encode(MsgType.HELLO, {"pid": 1})


async def test_foreign_uid_and_garbage_on_the_channel_are_dropped() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 5).start(nursery)
            streams = ss.streams
            chan = p.dir / "tk"
            os.chmod(chan, 0o666)  # a misconfiguration: only SO_PEERCRED stands in the way
            os.chmod(p.dir, 0o755)
            # Dropped before anything was sent: EOF, or a reset / broken pipe if our HELLO
            # was still unread when the proxy closed.
            probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                     "s.settimeout(10)\ntry:\n  s.sendall(bytes.fromhex(sys.argv[2]))\n"
                     "  print(repr(s.recv(100)))\n"
                     "except (ConnectionResetError, BrokenPipeError):\n  print(repr(b''))\n")
            # Another uid may not be able to run our interpreter (it may live under /root).
            python = next((x for x in (sys.executable, "/usr/bin/python3")
                           if _runnable_by_nobody(x)), None)
            if python is None:
                pytest.skip("no python interpreter that uid 65534 may run")
            res = await trio.to_thread.run_sync(lambda: subprocess.run(
                [python, "-c", probe, str(chan), hello_frame().hex()], user=65534,
                capture_output=True, text=True, timeout=30))
            assert res.stdout.strip() == "b''", res  # dropped before anything was sent
            await trio.to_thread.run_sync(lambda: p.wait_log(
                r"event=takeover_peer_refused .*peer_uid=65534 reason=\"uid differs\""))
            for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"PXTK\x00\x01\x00\x01\xff\xff" + b"x" * 50,
                            hello_frame()[:-3]):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(chan))
                    sock.sendall(garbage)
                    if garbage.startswith(b"PXTK") and len(garbage) < 40:
                        sock.shutdown(socket.SHUT_WR)  # truncated frame, then EOF
                    sock.settimeout(10)
                    reply = await trio.to_thread.run_sync(sock.recv, 100)
                    assert reply == b""
            await trio.to_thread.run_sync(lambda: p.wait_log(r"event=takeover_peer_dropped "))
            assert p.count(r"event=takeover_peer_dropped ") == 3
            await wait_until(streams_progress(streams))
            assert metric(p, "proxy_upgrades_total", result="failed") == 0
            await upgrade(p)  # the channel still works for a real upgrade
            await wait_until(streams_progress(streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(streams)


async def test_a_thousand_connections_handed_over() -> None:
    n = 1000
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            streams = []
            for _ in range(n):
                streams.append(await trio.open_tcp_stream("127.0.0.1", p.port))

            async def ping_all(tag: bytes) -> None:
                async def one(i: int, st: trio.SocketStream) -> None:
                    msg = b"%s %d\n" % (tag, i)
                    await st.send_all(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += await st.receive_some(100)
                    assert got == msg

                async with trio.open_nursery() as inner:
                    for i, st in enumerate(streams):
                        inner.start_soon(one, i, st)

            await ping_all(b"before")
            await upgrade(p)
            await ping_all(b"after")
            text = p.text()
            assert f"moved={n}" in text or metric(p, "proxy_handover_connections_total") >= n
            assert metric(p, "proxy_connections_active", listener="web") == n
            for st in streams:
                await st.aclose()
            nursery.cancel_scope.cancel()


async def test_new_code_on_disk_becomes_the_next_generation() -> None:
    """A hot *binary* upgrade: the next generation runs what is on disk now (its own version)."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 5).start(nursery)
            streams = ss.streams
            await wait_until(streams_progress(streams))
            assert metric(p, "proxy_build_info", version="9.9.9") == 0
            shutil.copytree(ROOT / "proxy", p.dir / "proxy",
                            ignore=shutil.ignore_patterns("__pycache__"))
            init = p.dir / "proxy" / "__init__.py"
            init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+'))
            new = await upgrade(p)
            p.wait_log(rf"pid={new} phase=serving version=9\.9\.9\+")
            version = "9.9.9+" + __version__  # what the copy on disk now says
            assert metric(p, "proxy_build_info", version=version) == 1
            await wait_until(streams_progress(streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(streams)


def test_upgrade_command_reports_success_and_rollback() -> None:
    with Backend(echo) as be:
        p = Proxy([be.addr])
        try:
            p.start()
            old = p.pid()
            cmd = [sys.executable, "-m", "proxy", "upgrade", "--config", str(p.config)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=p.env)
            assert res.returncode == 0, res.stderr
            new = p.pid()
            assert new != old and f"{old} -> {new}" in res.stdout
            p.arm_fault("new:before_ready:crash")
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=p.env)
            assert res.returncode == 1
            assert "rolled back" in res.stderr and "exited with status 3" in res.stderr
            assert p.pid() == new
            p.disarm_fault()
            # A config that does not validate is refused before anything is signalled.
            break_config(p)
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=p.env)
            assert res.returncode == 2 and "bogus: unknown key" in res.stderr
            assert p.pid() == new and p.count(f"event=phase gen=2 pid={new} phase=spawning") == 1
        finally:
            p.stop()
