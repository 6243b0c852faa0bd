"""Review of worker processes (issue 10): reproducers for what the review found. Real processes,
bounded waits, cleanup by pid (as tests/e2e/test_workers.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from tests.e2e.test_upgrade import deployment
from tests.e2e.test_workers import flowing, metric_t, wait_metric_t, workers
from tests.support.load import wait_until
from tests.support.proc import Proxy, alive


async def _stop_new_worker_between_ready_and_serve(p: Proxy) -> tuple[int, int, int]:
    """Upgrade with new worker 0 SIGSTOPped after its peer session said READY and before its
    supervisor says SERVE (the old side holds 1.5 s after each READY: `old:after_ready:delay`).
    Returns (old supervisor, new supervisor, stopped new worker 0)."""
    sup, old = p.pid(), workers(p)
    mark = len(p.text())
    p.arm_fault("old:after_ready:delay")
    os.kill(sup, signal.SIGUSR2)
    # Old worker 0 logs the fault the moment its successor (new worker 0) said READY.
    await trio.to_thread.run_sync(lambda: p.wait_log(
        rf"event=test_fault gen=1 pid={old[0]} worker=0 side=old step=after_ready", start=mark))
    m = await trio.to_thread.run_sync(lambda: p.wait_log(
        r"event=worker_spawned gen=2 pid=(\d+) worker=0 worker_pid=(\d+)", start=mark))
    new_sup, victim = int(m.group(1)), int(m.group(2))
    os.kill(victim, signal.SIGSTOP)
    p.disarm_fault()
    return sup, new_sup, victim


def stopped(pid: int) -> bool:
    """SIGSTOPped (state T)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def test_a_new_worker_hung_between_ready_and_serve_is_found_and_replaced() -> None:
    # README (Workers): "a worker silent for worker_timeout is killed and replaced". A new worker
    # that hangs after READY, before it reports SERVING, is never polled for silence
    # (heartbeat() skips workers whose `serving` is not set) and never replaced (_watch()
    # replaces only a worker that served): the generation runs one worker short for good.
    # Either outcome is right (the upgrade rolls back, or the hung worker is replaced); a
    # serving generation that keeps a hung worker is not.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "worker_timeout": 1.0,
                                "upgrade_timeout": 4.0}) as p:
            victim = 0
            try:
                sup, new_sup, victim = await _stop_new_worker_between_ready_and_serve(p)
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"event=(workers_serving gen=2 pid={new_sup}|upgrade_failed gen=1 "
                    rf"pid={sup}) ", timeout=20))

                def healthy() -> bool:
                    ws = workers(p)
                    return (len(ws) == 2 and victim not in ws.values()
                            and all(alive(w) and not stopped(w) for w in ws.values()))

                await wait_until(healthy, timeout=10)
            finally:
                if victim and alive(victim):
                    os.kill(victim, signal.SIGCONT)
                    os.kill(victim, signal.SIGKILL)
            nursery.cancel_scope.cancel()


async def test_counters_never_go_down_when_a_new_worker_is_slow_after_the_handover() -> None:
    # README (Workers): "the new supervisor serves /metrics only once every new worker has
    # them". serve_all() gives up after upgrade_timeout and /metrics then sums the stuck
    # worker's last REPORT, taken before its peer's RELEASED was restored: everything old
    # worker 0 ever counted is missing from the sum, and the counter goes down.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "worker_timeout": 30.0,
                                "upgrade_timeout": 4.0, "drain_timeout": 2.0}) as p:
            ss = await flowing(nursery, p, 20, 0)
            per = [await metric_t(p, "proxy_worker_connections_active", worker=str(k))
                   for k in (0, 1)]
            assert min(per) > 0, per  # both old workers counted some
            before = await metric_t(p, "proxy_connections_accepted_total", listener="web")
            ss.stop.set()
            await wait_until(lambda: not any(s.open for s in ss.streams))
            victim = 0
            try:
                _, new_sup, victim = await _stop_new_worker_between_ready_and_serve(p)
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"event=workers_serving gen=2 pid={new_sup} ", timeout=20))
                after = await metric_t(p, "proxy_connections_accepted_total", listener="web")
                assert after >= before, f"accepted_total went down: {before} -> {after}"
            finally:
                if victim and alive(victim):
                    os.kill(victim, signal.SIGCONT)
                    os.kill(victim, signal.SIGKILL)
            nursery.cancel_scope.cancel()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_worker_restarts_and_upgrades_leak_no_fd_in_the_supervisor() -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2}) as p:
            sup = p.pid()
            await wait_until(lambda: len(workers(p)) == 2)
            base = fds(sup)
            for i in range(4):
                victim = workers(p)[0]
                os.kill(victim, signal.SIGKILL)
                await wait_until(lambda v=victim: workers(p)[0] != v and alive(  # type: ignore[misc]
                    workers(p)[0]))
                await trio.to_thread.run_sync(lambda n=i + 1: p.wait_log(  # type: ignore[misc]
                    rf"event=worker_restarted gen=1 pid={sup} worker=0 (.|\n)*" * n))
            await wait_until(lambda: fds(sup) <= base, timeout=5)
            await trio.to_thread.run_sync(p.upgrade)
            new = p.pid()
            await wait_until(lambda: len(workers(p)) == 2 and all(
                alive(w) for w in workers(p).values()))
            base = fds(new)
            for _ in range(3):
                await trio.to_thread.run_sync(p.upgrade)
            await wait_until(lambda: len(workers(p)) == 2)
            newest = p.pid()
            await wait_until(lambda: fds(newest) <= base, timeout=5)
            nursery.cancel_scope.cancel()


async def _commit_with_old_worker_1_stopped(p: Proxy, stopped_pids: list[int]
                                           ) -> tuple[int, dict[int, int], int, int]:
    """SIGUSR2, and old worker 1 SIGSTOPped while it waits at its gate: the old supervisor
    commits (RELEASE) and worker 0 hands over at once, worker 1 does not answer. Returns (old
    supervisor, old workers, log mark, new worker 0)."""
    sup, old = p.pid(), workers(p)
    mark = len(p.text())
    p.arm_fault("old:after_ready:delay")
    os.kill(sup, signal.SIGUSR2)
    # The old supervisor got READY (all new workers are up): hold it there until both old
    # workers wait at their gates (PEER_READY sent), then stop worker 1.
    await trio.to_thread.run_sync(lambda: p.wait_log(
        rf"event=test_fault gen=1 pid={sup} side=old step=after_ready", start=mark))
    os.kill(sup, signal.SIGSTOP)
    stopped_pids.append(sup)
    p.disarm_fault()
    for k in (0, 1):
        await trio.to_thread.run_sync(lambda k=k: p.wait_log(  # type: ignore[misc]
            rf"event=worker_gating gen=1 pid={old[k]} worker={k} ", start=mark))
    os.kill(old[1], signal.SIGSTOP)
    stopped_pids.append(old[1])
    os.kill(sup, signal.SIGCONT)
    stopped_pids.remove(sup)
    m = await trio.to_thread.run_sync(lambda: p.wait_log(
        r"event=takeover_serving gen=2 pid=(\d+) worker=0 ", start=mark))
    return sup, old, mark, int(m.group(1))


async def test_an_old_worker_that_fails_at_the_commit_keeps_its_counts() -> None:
    # An old worker that does not release at the commit (Pool.gate(): worker_handover_failed,
    # SIGTERM: it finishes what it holds and exits) never carries its counters over a session,
    # and _watch() restores a dead worker's last report only while not committed: everything
    # it ever counted leaves the sums, and proxy_connections_accepted_total goes down.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "upgrade_timeout": 10.0,
                                "drain_timeout": 3.0}) as p:
            ss = await flowing(nursery, p, 20, 0)
            per = [await metric_t(p, "proxy_worker_connections_active", worker=str(k))
                   for k in (0, 1)]
            assert min(per) > 0, per
            await wait_metric_t(p, "proxy_connections_accepted_total", 20, listener="web")
            before = await metric_t(p, "proxy_connections_accepted_total", listener="web")
            stopped_pids: list[int] = []
            try:
                sup, old, mark, _ = await _commit_with_old_worker_1_stopped(p, stopped_pids)
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"event=workers_released gen=1 pid={sup} released=1 ", start=mark,
                    timeout=20))
            finally:
                for pid in stopped_pids:
                    if alive(pid):
                        os.kill(pid, signal.SIGCONT)
            ss.stop.set()
            await wait_until(lambda: not alive(old[1]) and not alive(sup), timeout=20)
            after = await metric_t(p, "proxy_connections_accepted_total", listener="web")
            assert after >= before, f"accepted_total went down: {before} -> {after}"
            nursery.cancel_scope.cancel()


async def test_the_upgrade_deadline_does_not_roll_back_after_the_commit() -> None:
    # Pool.gate() sets `committed` and sends RELEASE to every old worker; an old worker that is
    # slow to answer (busy, or stopped for a while) keeps the gate waiting, and the attempt's
    # upgrade_timeout (counted from the spawn) fires meanwhile: the attempt rolls back and kills
    # the new supervisor, so the new worker that already took (and ACKed) old worker 0's
    # connections exits with them.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "upgrade_timeout": 10.0}) as p:
            ss = await flowing(nursery, p, 20, 0)
            stopped_pids: list[int] = []
            try:
                sup, _, mark, new_w0 = await _commit_with_old_worker_1_stopped(p, stopped_pids)
                # Old worker 0 handed over to new worker 0; whatever happens to worker 1, the
                # old side must not take the service back by killing the new generation: the
                # attempt ends released (once the gate gives up on worker 1), not rolled back.
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    rf"event=(phase gen=1 pid={sup} phase=released|upgrade_failed gen=1 "
                    rf"pid={sup}) ", start=mark, timeout=20))
                assert alive(new_w0), "the new worker holding old worker 0's connections died:\n" + p.tail(60)
                assert p.find_log(rf"event=upgrade_child_killed gen=1 pid={sup} ", mark) is None
            finally:
                for pid in stopped_pids:
                    if alive(pid):
                        os.kill(pid, signal.SIGCONT)
            ss.stop.set()
            nursery.cancel_scope.cancel()


async def test_metrics_and_heartbeat_survive_a_worker_that_stops_reading() -> None:
    # Pool.poll() sends a POLL to every live worker on each heartbeat and each scrape, with no
    # bound: a worker that is alive but not reading (stopped, or its loop blocked) for less than
    # worker_timeout gets them queued until its control socket is full (about 280 lines), and
    # from then on every send blocks: the heartbeat stops for every worker and every /metrics
    # scrape hangs. Concurrent scrapes fill it in a second.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, deployment(
                nursery, proxy={"workers": 2, "worker_timeout": 600.0}) as p:
            victim = workers(p)[1]
            os.kill(victim, signal.SIGSTOP)
            try:
                async def scrape() -> None:
                    with trio.move_on_after(3):
                        s = await trio.open_tcp_stream("127.0.0.1", p.metrics_port)
                        async with s:
                            await s.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                             b"Connection: close\r\n\r\n")
                            while await s.receive_some(65536):
                                pass

                async with trio.open_nursery() as scrapes:
                    for _ in range(400):
                        scrapes.start_soon(scrape)
                with trio.fail_after(8):
                    assert await metric_t(p, "proxy_workers") == 2
            finally:
                if alive(victim):
                    os.kill(victim, signal.SIGCONT)
            nursery.cancel_scope.cancel()
