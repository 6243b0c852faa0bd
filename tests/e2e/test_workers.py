"""Worker processes (`[proxy] workers`): a supervisor and N workers per generation, upgraded as
one. Real processes, sockets and signals; load through the proxy the whole time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.e2e.test_tcp import metric
from tests.e2e.test_upgrade import assert_clean, deployment, streams_progress, upgrade
from tests.support.load import ShortConns, StreamSet, wait_until
from tests.support.proc import Proxy, alive


def workers(p: Proxy) -> dict[int, int]:
    """The serving supervisor's workers, index -> pid (the latest spawn or restart of each)."""
    sup = p.pid()
    out: dict[int, int] = {}
    for m in re.finditer(rf"event=worker_(?:spawned|restarted) gen=\d+ pid={sup} worker=(\d+) "
                         r"worker_pid=(\d+)", p.text()):
        out[int(m.group(1))] = int(m.group(2))
    return out


async def flowing(nursery: trio.Nursery, p: Proxy, n: int, replies: int = 0) -> StreamSet:
    """`n` sequence-checked streams through the proxy, each past `replies` echoes."""
    ss = StreamSet(p.port, n).start(nursery)
    await wait_until(lambda: all(s.replies > replies for s in ss.streams))
    return ss


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def set_workers(p: Proxy, n: int) -> None:
    p.proxy_section["workers"] = n
    p.write_config()


async def metric_t(p: Proxy, name: str, **labels: str) -> float:
    return await trio.to_thread.run_sync(lambda: metric(p, name, **labels))


async def wait_metric_t(p: Proxy, name: str, want: float, timeout: float = 10.0,
                        **labels: str) -> None:
    with trio.fail_after(timeout):
        while await metric_t(p, name, **labels) != want:
            await trio.sleep(0.05)


async def test_workers_serve_every_connection_spread_over_all_of_them() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            sup = p.pid()
            ws = workers(p)
            assert sorted(ws) == [0, 1] and all(alive(pid) for pid in ws.values())
            assert "proxy: generation 1 serving" in title(sup)
            for k, pid in ws.items():
                want = f"proxy: generation 1 worker {k} serving"
                await wait_until(partial(lambda w, q: w in title(q), want, pid), timeout=10)
            assert re.search(rf"event=listening gen=1 pid={ws[1]} worker=1 ", p.text())
            ss = await flowing(nursery, p, 40, 3)
            assert await metric_t(p, "proxy_workers") == 2
            assert await metric_t(p, "proxy_connections_active", listener="web") == 40
            per = [await metric_t(p, "proxy_worker_connections_active", worker=str(k))
                   for k in (0, 1)]
            assert sum(per) == 40 and min(per) >= 10, per  # each takes its share
            ss.stop.set()
            assert_clean(ss.streams)
            nursery.cancel_scope.cancel()


async def test_upgrades_under_load_with_two_workers_lose_nothing_and_count_exactly() -> None:
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = StreamSet(p.port, 30).start(nursery)
            shorts = [ShortConns(p.port, i) for i in range(2)]
            stop_shorts = trio.Event()
            for sc in shorts:
                nursery.start_soon(sc.run, stop_shorts)
            await wait_until(lambda: all(s.replies > 0 for s in ss.streams))
            seen_accepted = 0.0
            for i in range(5):
                old_sup, old_workers = p.pid(), workers(p)
                await upgrade(p)
                await wait_until(lambda ws=old_workers: not any(alive(w)  # type: ignore[misc]
                                                              for w in ws.values()))
                assert not alive(old_sup)
                assert sorted(workers(p)) == [0, 1]
                await wait_until(streams_progress(ss.streams))
                assert await metric_t(p, "proxy_generation") == i + 2
                accepted = await metric_t(p, "proxy_connections_accepted_total", listener="web")
                assert accepted >= seen_accepted, "a counter went down across an upgrade"
                seen_accepted = accepted
            stop_shorts.set()
            ss.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            assert_clean(ss.streams)
            assert not [f for sc in shorts for f in sc.failures]
            connected = sum(sc.connected for sc in shorts)
            # Every connection the clients made is counted once, across 5 generations.
            await wait_metric_t(p, "proxy_connections_accepted_total", 30 + connected,
                                listener="web")
            assert await metric_t(p, "proxy_upgrades_total", result="success") == 5
            nursery.cancel_scope.cancel()


async def test_worker_count_changes_across_upgrades_under_a_connect_loop() -> None:
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 4}) as p:
            ss = StreamSet(p.port, 24).start(nursery)
            shorts = [ShortConns(p.port, i, pace=0) for i in range(3)]
            stop_shorts = trio.Event()
            for sc in shorts:
                nursery.start_soon(sc.run, stop_shorts)
            await wait_until(lambda: all(s.replies > 0 for s in ss.streams))
            for n in (2, 4, 1, 3, 1, 2):
                set_workers(p, n)
                before = sum(sc.ok for sc in shorts)
                await upgrade(p)
                want = list(range(n)) if n > 1 else []
                assert sorted(workers(p)) == want
                assert await metric_t(p, "proxy_workers") == n
                await wait_until(streams_progress(ss.streams))
                await wait_until(lambda b=before: sum(sc.ok for sc in shorts) > b + 20)  # type: ignore[misc]
            stop_shorts.set()
            ss.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            assert_clean(ss.streams)
            failures = [f for sc in shorts for f in sc.failures]
            assert not failures, failures[:5]
            nursery.cancel_scope.cancel()


async def test_a_worker_killed_is_restarted_and_the_others_connections_are_untouched() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 30, 2)
            victim = workers(p)[0]
            held = await metric_t(p, "proxy_worker_connections_active", worker="0")
            assert held > 0
            assert await metric_t(p, "proxy_worker_process_open_fds", worker="0") >= 2 * held
            accepted = await metric_t(p, "proxy_connections_accepted_total", listener="web")
            os.kill(victim, signal.SIGKILL)
            await trio.to_thread.run_sync(
                lambda: p.wait_log(rf"event=worker_restarted gen=1 pid={p.pid()} worker=0 "))
            assert workers(p)[0] != victim and alive(workers(p)[0])
            dead = [s for s in ss.streams if s.error]
            await wait_until(lambda: len([s for s in ss.streams if s.error]) >= held)
            dead = [s for s in ss.streams if s.error]
            # Exactly the victim's connections died with it; every other stream goes on.
            assert len(dead) == held
            live = [s for s in ss.streams if not s.error]
            await wait_until(streams_progress(live))
            assert await metric_t(p, "proxy_worker_restarts_total", reason="died") == 1
            assert await metric_t(p, "proxy_worker_lost_connections_total") == held
            # The dead worker's counts stay counted (its last report joins the supervisor's).
            assert await metric_t(p, "proxy_connections_accepted_total",
                                  listener="web") == accepted
            more = StreamSet(p.port, 10).start(nursery)  # the restarted worker takes new ones
            await wait_until(lambda: all(s.replies > 2 for s in more.streams))
            more.stop.set()
            ss.stop.set()
            assert_clean(more.streams)
            nursery.cancel_scope.cancel()


async def test_a_hung_worker_is_found_by_heartbeat_and_replaced() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "worker_timeout": 1.0}) as p:
            victim = workers(p)[1]
            os.kill(victim, signal.SIGSTOP)
            try:
                await trio.to_thread.run_sync(
                    lambda: p.wait_log(rf"event=worker_hung gen=1 pid={p.pid()} worker=1 "))
                await trio.to_thread.run_sync(
                    lambda: p.wait_log(rf"event=worker_restarted gen=1 pid={p.pid()} worker=1 "))
            finally:
                if alive(victim):
                    os.kill(victim, signal.SIGCONT)
            await wait_until(lambda: not alive(victim), timeout=10)
            assert await metric_t(p, "proxy_worker_restarts_total", reason="hung") == 1
            ss = await flowing(nursery, p, 10, 2)
            ss.stop.set()
            assert_clean(ss.streams)
            nursery.cancel_scope.cancel()


async def test_a_new_worker_that_fails_to_start_rolls_back_the_whole_generation() -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 20, 0)
            sup, ws = p.pid(), workers(p)
            p.arm_fault("worker1:start:exit")
            cmd = [sys.executable, "-m", "proxy", "upgrade", "--config", str(p.config)]
            res = await trio.to_thread.run_sync(lambda: subprocess.run(
                cmd, capture_output=True, text=True, timeout=60, env=p.env))
            # `proxy upgrade` reports the supervisor's outcome, with the worker's reason.
            assert res.returncode == 1 and "worker 1 failed to start" in res.stderr, res.stderr
            p.disarm_fault()
            assert p.pid() == sup and workers(p) == ws and all(alive(w) for w in ws.values())
            await wait_until(streams_progress(ss.streams))
            assert await metric_t(p, "proxy_upgrades_total", result="failed") == 1
            res = await trio.to_thread.run_sync(lambda: subprocess.run(
                cmd, capture_output=True, text=True, timeout=60, env=p.env))
            assert res.returncode == 0 and f"{sup} -> {p.pid()}" in res.stdout, res.stderr
            await wait_until(streams_progress(ss.streams))
            ss.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            assert_clean(ss.streams)
            nursery.cancel_scope.cancel()


async def test_a_new_generation_dying_at_released_leaves_the_old_one_serving_everything() -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 20, 0)
            sup, ws = p.pid(), workers(p)
            mark = len(p.text())
            # Every new process (supervisor and workers) dies the moment it is released to.
            p.arm_fault("new:after_released:crash")
            os.kill(sup, signal.SIGUSR2)
            await trio.to_thread.run_sync(
                lambda: p.wait_log(rf"event=successor_lost gen=1 pid={sup} ", start=mark))
            p.disarm_fault()
            for k in (0, 1):  # each old worker took back what it had not handed over
                await trio.to_thread.run_sync(lambda k=k: p.wait_log(  # type: ignore[misc]
                    rf"event=worker_successor_lost gen=1 pid={sup} worker={k} serve_on=True",
                    start=mark))
            await trio.to_thread.run_sync(lambda: p.wait_log(
                rf"event=upgrade_failed gen=1 pid={sup} ", start=mark))
            assert p.pid() == sup and all(alive(w) for w in ws.values())
            await wait_until(streams_progress(ss.streams))
            ss.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            assert_clean(ss.streams)  # nothing lost: nothing had been ACKed yet
            more = StreamSet(p.port, 6).start(nursery)  # and it accepts again
            await wait_until(lambda: all(s.replies > 2 for s in more.streams))
            more.stop.set()
            assert_clean(more.streams)
            nursery.cancel_scope.cancel()


async def test_sigterm_stops_the_supervisor_and_every_worker_gracefully() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 6, 0)
            sup, ws = p.pid(), workers(p)
            os.kill(sup, signal.SIGTERM)
            # Each process logs draining once its copies of the listeners are closed.
            for pid in (sup, *ws.values()):
                await trio.to_thread.run_sync(lambda pid=pid: p.wait_log(  # type: ignore[misc]
                    rf"event=phase gen=1 pid={pid} .*phase=draining"))
            with pytest.raises(ConnectionRefusedError):  # every copy of the listener is closed
                await trio.to_thread.run_sync(
                    lambda: socket.create_connection(("127.0.0.1", p.port), timeout=5).close())
            ss.stop.set()  # the streams finish; then everybody exits
            assert p.proc is not None
            code = await trio.to_thread.run_sync(lambda: p.proc.wait(timeout=30))  # type: ignore[union-attr]
            assert code == 0
            await wait_until(lambda: not any(alive(w) for w in ws.values()), timeout=10)
            assert not p.pidfile.exists()
            tk = p.dir / "tk"
            assert not tk.exists() and not list(p.dir.glob("tk.w*"))
            assert_clean(ss.streams)
            nursery.cancel_scope.cancel()


async def test_sigterm_to_the_new_generation_at_released_stops_the_service_not_a_rollback(
        ) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            sup = p.pid()
            mark = len(p.text())
            p.arm_fault("new:after_released:delay")  # hold every new process right there
            os.kill(sup, signal.SIGUSR2)
            await trio.to_thread.run_sync(lambda: p.wait_log(
                r"event=test_fault gen=\d+ pid=\d+ side=new step=after_released", start=mark))
            await trio.to_thread.run_sync(
                lambda: p.wait_log(r"event=takeover_serving gen=2 pid=\d+ ", start=mark))
            new = p.pid()  # the new supervisor (a worker may have logged the fault first)
            assert new != sup
            os.kill(new, signal.SIGTERM)
            await wait_until(lambda: not alive(sup) and not alive(new), timeout=30)
            assert p.find_log(rf"event=successor_lost gen=1 pid={sup} ", mark) is None
            assert p.find_log(rf"event=successor_stopping gen=1 pid={sup} ", mark)
            assert not any(alive(pid) for pid in p.all_pids())  # every worker of both went
            nursery.cancel_scope.cancel()


async def test_workers_whose_supervisor_dies_finish_their_connections_and_exit() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 10, 0)
            sup, ws = p.pid(), workers(p)
            os.kill(sup, signal.SIGKILL)
            for pid in ws.values():  # each stops accepting and drains: no orphan serves on
                await trio.to_thread.run_sync(lambda pid=pid: p.wait_log(  # type: ignore[misc]
                    rf"event=supervisor_lost gen=1 pid={pid} "))
                await trio.to_thread.run_sync(lambda pid=pid: p.wait_log(  # type: ignore[misc]
                    rf"event=phase gen=1 pid={pid} .*phase=draining"))
            with pytest.raises(ConnectionRefusedError):
                await trio.to_thread.run_sync(
                    lambda: socket.create_connection(("127.0.0.1", p.port), timeout=5).close())
            await wait_until(streams_progress(ss.streams))  # what they hold is served on
            ss.stop.set()
            await wait_until(lambda: not any(alive(w) for w in ws.values()), timeout=20)
            assert_clean(ss.streams)
            nursery.cancel_scope.cancel()


async def test_new_workers_orphaned_before_serve_finish_what_they_took() -> None:
    """The new supervisor dies after the old workers released to its workers, before it could
    tell them to SERVE: they accept nothing, finish the connections they took, and the old
    generation serves again. No stream breaks."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery, deployment(nursery,
                                                              proxy={"workers": 2}) as p:
            ss = await flowing(nursery, p, 20)
            sup = p.pid()
            mark = len(p.text())
            # Every old process waits 1.5 s after the gate: the workers before their RELEASED,
            # then the supervisor before the generation's RELEASED (the window we want).
            p.arm_fault("old:after_gate:delay")
            os.kill(sup, signal.SIGUSR2)
            for k in (0, 1):
                await trio.to_thread.run_sync(lambda k=k: p.wait_log(  # type: ignore[misc]
                    rf"event=phase gen=1 pid=\d+ worker={k} phase=released ", start=mark))
            m = await trio.to_thread.run_sync(lambda: p.wait_log(
                r"event=phase gen=2 pid=(\d+) phase=taking_over", start=mark))
            new_sup = int(m.group(1))
            os.kill(new_sup, signal.SIGKILL)
            p.disarm_fault()
            for _ in (0, 1):
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    r"event=supervisor_lost gen=2 pid=\d+ worker=\d .*before=serve", start=mark))
            await trio.to_thread.run_sync(lambda: p.wait_log(
                rf"event=upgrade_failed gen=1 pid={sup} ", start=mark))
            assert p.pid() == sup
            await wait_until(streams_progress(ss.streams))  # moved ones too: nothing broke
            more = await flowing(nursery, p, 6, 2)  # and the old generation accepts again
            ss.stop.set()
            more.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            assert_clean(ss.streams)
            assert_clean(more.streams)
            nursery.cancel_scope.cancel()
