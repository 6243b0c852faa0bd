"""Review of worker processes (issue 10): reproducers for what the review found. Real processes,
bounded waits, cleanup by pid (as tests/e2e/test_workers.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from tests.e2e.test_upgrade import deployment
from tests.e2e.test_workers import metric_t, workers
from tests.support.load import StreamSet, wait_until
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
            ss = StreamSet(p.port, 20).start(nursery)
            await wait_until(lambda: all(s.replies > 0 for s in ss.streams))
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
