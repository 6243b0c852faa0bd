"""The takeover at its edges, with real processes: signals during a handover (queued, coalesced,
forwarded, reported), peers that break the protocol, a fake old generation sending garbage, and
either generation dying after RELEASED."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trio

from proxy import fdpass
from proxy.channel import Channel, ChannelError, PeerAborted
from proxy.frames import encode
from proxy.takeover import (
    PROTOCOLS,
    Hello,
    Listeners,
    MsgType,
    Ready,
    Role,
    Session,
    Welcome,
)
from tests.e2e.test_tcp import metric
from tests.e2e.test_upgrade import assert_clean, deployment, streams_progress, upgrade
from tests.support.load import StreamSet, wait_until
from tests.support.proc import Proxy, alive, render_config


def upgrade_cmd(p: Proxy) -> list[str]:
    return [sys.executable, "-m", "proxy", "upgrade", "--config", str(p.config)]


async def run_cmd(p: Proxy, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, env=p.env))


def serving_generations(p: Proxy) -> list[int]:
    """Pids of this deployment whose process title says they serve."""
    out = []
    for pid in p.all_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if alive(pid) and b"serving" in title:
            out.append(pid)
    return out


async def test_sigusr2_during_a_handover_is_queued_and_reported() -> None:
    """Two `proxy upgrade` at once: the second signal lands while the first handover runs; it is
    carried out right after, and each command reports the attempt its own signal caused."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 10).start(nursery)
            await wait_until(streams_progress(ss.streams))
            first = p.pid()
            results: list[subprocess.CompletedProcess[str]] = []

            async def one() -> None:
                results.append(await run_cmd(p, upgrade_cmd(p)))

            p.arm_fault("new:before_ready:delay")  # a wide window for the second signal
            nursery.start_soon(one)
            # The second signal goes out while the first attempt is under way.
            await trio.to_thread.run_sync(lambda: p.wait_log(
                r"event=test_fault gen=\d+ pid=\d+ side=new step=before_ready"))
            p.disarm_fault()
            second = await run_cmd(p, upgrade_cmd(p))
            await wait_until(lambda: len(results) == 1, timeout=60)
            assert results[0].returncode == 0, results[0].stderr
            assert second.returncode == 0, second.stderr
            a = re.search(r"upgraded: pid (\d+) -> (\d+)", results[0].stdout)
            b = re.search(r"upgraded: pid (\d+) -> (\d+)", second.stdout)
            assert a and b, (results[0].stdout, second.stdout)
            assert int(a.group(1)) == first and int(b.group(1)) == int(a.group(2))
            assert p.count(r"event=upgrade_queued ") >= 1
            await wait_until(lambda: p.serving_pid() == int(b.group(2)) and not alive(first)
                             and not alive(int(a.group(2))), timeout=30)
            await wait_until(streams_progress(ss.streams))
            assert metric(p, "proxy_generation") == 3
            assert metric(p, "proxy_upgrades_total", result="success") == 2
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)


async def test_a_storm_of_signals_is_one_upgrade_more() -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 10).start(nursery)
            await wait_until(streams_progress(ss.streams))
            first = p.pid()
            t0 = time.time()
            for _ in range(5):
                os.kill(first, signal.SIGUSR2)
                await trio.sleep(0.02)  # the storm's spacing: 5 signals in 100 ms
            # The first signal's attempt, then exactly one for the four that came during it.
            await trio.to_thread.run_sync(lambda: p.wait_log(r"gen=3 pid=\d+ phase=serving",
                                                             timeout=60))
            await wait_until(lambda: len(p.all_pids() - {first}) == 2
                             and len(serving_generations(p)) == 1, timeout=30)
            from proxy.pidfile import attempts_since

            attempts = attempts_since(p.pidfile, t0)
            assert [a["result"] for a in attempts] == ["success", "success"], attempts
            assert p.count(r"event=upgrade_spawned ") == 2
            await wait_until(streams_progress(ss.streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)


async def test_a_signal_to_a_generation_that_released_is_forwarded() -> None:
    """A SIGUSR2 that reaches the old generation after RELEASED (a script read the pidfile a
    moment too early) goes to the generation it released to."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 5).start(nursery)
            await wait_until(streams_progress(ss.streams))
            first = p.pid()
            p.arm_fault("old:after_released:hang")  # the old generation stays, released
            os.kill(first, signal.SIGUSR2)
            m = await trio.to_thread.run_sync(lambda: p.wait_log(
                rf"pid={first} phase=released successor_pid=(\d+)"))
            second = int(m.group(1))
            p.disarm_fault()
            os.kill(first, signal.SIGUSR2)
            await trio.to_thread.run_sync(lambda: p.wait_log(
                rf"pid={first} .*event=upgrade_forwarded to_pid={second}|"
                rf"event=upgrade_forwarded gen=\d+ pid={first} to_pid={second}"))
            await trio.to_thread.run_sync(lambda: p.wait_log(r"gen=3 pid=\d+ phase=serving",
                                                             timeout=60))
            await wait_until(lambda: len(serving_generations(p)) == 1, timeout=30)
            os.kill(first, signal.SIGKILL)  # it hung on purpose; it held no client
            await ss.finish()
            nursery.cancel_scope.cancel()


# ---- peers that break the protocol before RELEASED: dropped, nothing changes ------------------

async def _liar(path: str, script: str) -> str:
    """A same-uid peer that speaks the protocol and then breaks it; returns what it observed."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    ch = Channel(sock, Session(Role.NEW, (1, 2)), 10.0)
    try:
        if script == "no_common_version":
            ch.session.protocols = (7, 9)
            await ch.send(Hello(os.getpid(), "liar", (7, 9)))
            try:
                await ch.receive()
            except PeerAborted as exc:
                return str(exc)
            return "no abort"
        await ch.send(Hello(os.getpid(), "liar", (1, 2)))
        await ch.receive()
        _, fds = await ch.receive()
        fds.close()  # we are not going to serve anything
        raw = {
            "ack_before_ready": encode(MsgType.ACK, {"ids": [1]}),
            "conns_from_the_new_side": encode(MsgType.CONNS, {"conns": []}),
            "welcome_from_the_new_side": encode(MsgType.WELCOME, {"pid": 1}),
            "garbage": b"PXTK\x00\x01\x00\x04\xff\xff" + b"x" * 50,
            "abort_before_ready": encode(MsgType.ABORT, {"reason": "changed my mind"}),
        }[script]
        await fdpass.send(sock, raw, [])
        with trio.move_on_after(10):
            while True:
                try:
                    await ch.receive()
                except PeerAborted as exc:
                    return str(exc)
                except ChannelError as exc:
                    return str(exc)
        return "no answer"
    finally:
        ch.close()


LIARS = ["no_common_version", "ack_before_ready", "conns_from_the_new_side",
         "welcome_from_the_new_side", "garbage", "abort_before_ready"]


async def test_peers_breaking_the_protocol_before_released_change_nothing() -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 6).start(nursery)
            await wait_until(streams_progress(ss.streams))
            old = p.pid()
            seen = {}
            for script in LIARS:
                seen[script] = await _liar(str(p.dir / "tk"), script)
                await wait_until(lambda: p.count(r"event=upgrade_failed ") == len(seen))
                assert p.serving_pid() == old
                await wait_until(streams_progress(ss.streams))
            assert "no common protocol version" in seen["no_common_version"]
            assert "not allowed in state" in seen["ack_before_ready"] or "peer aborted" in seen[
                "ack_before_ready"], seen
            assert metric(p, "proxy_upgrades_total", result="failed") == len(LIARS)
            assert metric(p, "proxy_generation") == 1
            await upgrade(p)  # and a real upgrade still goes through
            await wait_until(streams_progress(ss.streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)


# ---- a fake old generation: the new one never serves from its own error ----------------------

@pytest.mark.parametrize("protocol", [1, 2])
async def test_new_generation_never_serves_on_its_own_decode_error(protocol: int) -> None:
    """The measured split brain: a CONNS frame the new generation cannot decode, sent before
    RELEASED with two socketpair fds. The new generation ABORTs and exits 1; it never accepts,
    never writes the pidfile, never logs serving."""
    d = Proxy(["127.0.0.1:9"])  # only for its temp dir and config writer; never started
    chan_path = d.dir / "tk"
    d.write_config(render_config(d.proxy_section, [d.listener], {"app": d.upstream}))
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(chan_path))
    lsock.listen(1)
    pairs = [socket.socketpair() for _ in range(1)]
    closers: list[Callable[[], None]] = []
    log = open(d.log, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(d.config),
                             "--takeover"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=d.env, cwd=d.dir)
    try:
        with trio.fail_after(60):
            lsock.settimeout(30)
            conn, _ = await trio.to_thread.run_sync(lsock.accept)
            ch = Channel(conn, Session(Role.OLD, (protocol, protocol)), 20.0)
            closers.append(ch.close)
            hello, _ = await ch.receive()
            assert isinstance(hello, Hello) and hello.protocols == PROTOCOLS
            await ch.send(Welcome(os.getpid(), 1, time.time(), time.time(), "fake", protocol))
            await ch.send(Listeners(()))
            ready, _ = await ch.receive()
            assert isinstance(ready, Ready)
            a, b = pairs[0]
            await fdpass.send(conn, encode(MsgType.CONNS, {"conns": "garbage"}, b"", 2),
                              [a.fileno(), b.fileno()])
            with pytest.raises(PeerAborted):
                await ch.receive()
            code = await trio.to_thread.run_sync(lambda: proc.wait(30))
        text = d.text()
        assert code == 1, text
        assert "event=takeover_aborted" in text and "phase=serving" not in text, text
        assert not d.pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for close in closers:
            close()
        log.close()
        lsock.close()
        for x, y in pairs:
            x.close()
            y.close()
        d.stop()


# ---- either generation dying after RELEASED -------------------------------------------------

async def test_new_generation_dying_after_it_took_over_hands_back() -> None:
    """The new generation crashes holding a batch it never ACKed: the old one resumes it and
    serves again (nobody else does); the upgrade counts as failed."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 10).start(nursery)
            await wait_until(streams_progress(ss.streams))
            old = p.pid()
            p.arm_fault("new:after_conns:crash")
            os.kill(old, signal.SIGUSR2)
            await trio.to_thread.run_sync(lambda: p.wait_log(
                rf"event=successor_lost gen=1 pid={old} "))
            p.disarm_fault()
            await wait_until(lambda: p.serving_pid() == old)
            await wait_until(streams_progress(ss.streams))
            assert metric(p, "proxy_upgrades_total", result="failed") == 1
            assert serving_generations(p) == [old]
            await upgrade(p)
            await wait_until(streams_progress(ss.streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)


async def test_old_generation_dying_after_everything_moved_loses_nothing() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            ss = StreamSet(p.port, 10).start(nursery)
            await wait_until(streams_progress(ss.streams))
            old = p.pid()
            p.arm_fault("old:before_done:crash")
            os.kill(old, signal.SIGUSR2)
            await wait_until(lambda: not alive(old) and p.serving_pid() not in (None, old))
            p.disarm_fault()
            await trio.to_thread.run_sync(lambda: p.wait_log(r"event=predecessor_session_ended "))
            await wait_until(streams_progress(ss.streams))
            await upgrade(p)  # the survivor can be upgraded in turn
            await wait_until(streams_progress(ss.streams))
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)


async def test_old_generation_dying_right_after_release_loses_only_what_it_held() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            held = StreamSet(p.port, 5).start(nursery)
            await wait_until(streams_progress(held.streams))
            old = p.pid()
            p.arm_fault("old:after_released:crash")
            os.kill(old, signal.SIGUSR2)
            await wait_until(lambda: not alive(old) and p.serving_pid() not in (None, old))
            p.disarm_fault()
            await wait_until(lambda: all(s.error for s in held.streams))  # they died with it
            fresh = StreamSet(p.port, 5).start(nursery)  # the new generation serves
            await wait_until(streams_progress(fresh.streams))
            assert serving_generations(p) == [p.pid()]
            await upgrade(p)
            await wait_until(streams_progress(fresh.streams))
            await fresh.finish()
            await held.finish()
            nursery.cancel_scope.cancel()
    assert_clean(fresh.streams)


async def test_a_signal_while_a_peer_holds_the_channel_is_carried_out_after_it() -> None:
    """Half a HELLO held open on the channel (one session at a time): a SIGUSR2 meanwhile is
    queued and carried out once that peer is dropped."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            old = p.pid()
            peer = socket.socket(socket.AF_UNIX)
            try:
                peer.connect(str(p.dir / "tk"))
                peer.sendall(encode(MsgType.HELLO, {"pid": 1})[:-3])
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"pid={old} phase=handshake peer_pid={os.getpid()}"))
                os.kill(old, signal.SIGUSR2)
                await trio.to_thread.run_sync(lambda: p.wait_log(r"event=upgrade_queued "))
            finally:
                peer.close()
            await trio.to_thread.run_sync(lambda: p.wait_log(r"event=takeover_peer_dropped "))
            await wait_until(lambda: p.serving_pid() not in (None, old) and not alive(old),
                             timeout=30)
            assert metric(p, "proxy_upgrades_total", result="success") == 1
            nursery.cancel_scope.cancel()


async def test_new_generation_frozen_across_released_carries_on() -> None:
    """SIGSTOP of the new generation right after READY, held past upgrade_timeout: RELEASED
    waits in its socket. On SIGCONT it reads it (not "timed out") and serves; the old one waited
    for it rather than serving beside it, and no stream noticed more than the freeze."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"upgrade_timeout": 2.0}) as p:
            ss = StreamSet(p.port, 6).start(nursery)
            await wait_until(streams_progress(ss.streams))
            old = p.pid()
            mark = len(p.text())
            os.kill(old, signal.SIGUSR2)
            m = await trio.to_thread.run_sync(lambda: p.wait_log(
                r"event=phase gen=2 pid=(\d+) phase=taking_over", start=mark))
            new = int(m.group(1))
            os.kill(new, signal.SIGSTOP)
            try:
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"pid={old} phase=released successor_pid={new}", start=mark))
                await trio.sleep(3.0)  # the fault itself: frozen past upgrade_timeout
                assert serving_generations(p) == [new] or not serving_generations(p)
            finally:
                os.kill(new, signal.SIGCONT)
            await wait_until(lambda: p.serving_pid() == new and not alive(old), timeout=30)
            assert "event=takeover_aborted" not in p.text()
            await wait_until(streams_progress(ss.streams))
            assert metric(p, "proxy_upgrades_total", result="success") == 1
            await ss.finish()
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)
