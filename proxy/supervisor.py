"""A generation with workers (`[proxy] workers` > 1): the supervisor process and its pool.

The supervisor is the generation's entry point: it holds the pidfile, takes SIGUSR2, SIGTERM
and SIGINT, is MAINPID for systemd, hosts `/metrics` (the sum over its workers) and restarts a
worker that dies or stops answering. It does not serve traffic itself: a crash in request
handling then costs one worker, never the generation's signals, pidfile or metrics (nginx's
master and HAProxy's master-worker split the same way).

Every worker accepts on the same listening sockets (the supervisor binds them once, or takes
them from the previous generation, and passes them at spawn), so changing the worker count
across an upgrade closes no listening socket: no SYN and no queued connection can be lost (with
SO_REUSEPORT each socket has its own queue, dropped when it closes).

An upgrade is the ordinary takeover session between the two supervisors (`upgrade.py` /
`adopt.py`), carrying no connections, plus one session per old worker with a new worker, which
carries that worker's connections straight from process to process:

    S_old: SIGUSR2 -> spawn S_new --------- generation session ---------> S_new
           LISTENERS (+ each worker's channel)                            spawn m workers:
                                                                          new k takes from the
                                                                          old workers j, j%m==k
    old worker j  <----- its own session (HELLO .. READY) -----  new worker
    old worker j: PEER_READY, waits                               new workers: READY
                                                  <- READY (all new workers ready)
    S_old: every old worker waits? RELEASE them; each sends RELEASED to its successor,
           then its CONNS batches (in parallel across workers)
    S_old: RELEASED ->                                             S_new serves: pidfile,
                                                                   SERVE to every worker
    old workers exit when they hold nothing; S_old sends DONE when they all did, and exits.

Any failure before the old supervisor sends RELEASE (a new worker that cannot start, a session
that breaks, a timeout) rolls back the whole generation: every old worker is told ABORT (its
session ABORTs, it never stopped accepting), S_new is killed and its workers exit with it.

Fd ownership: the supervisor owns the listening sockets and the worker channels' listening
sockets (each worker gets copies at spawn); a `Handle` owns its control link.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy import __version__, log, metrics_http, notify, pidfile, sigdispatch
from proxy.adopt import WORKER_CHANNEL, Options, Serving, TakeoverRefused, take_over
from proxy.channel import Channel, bind_channel
from proxy.child import STDERR_FD_ENV
from proxy.config import Config
from proxy.ctlink import ControlLink
from proxy.loads import Loads
from proxy.metrics import Metrics, merged
from proxy.server import METRICS_LISTENER, Server
from proxy.upgrade import Hooks, Phase, SessionFailed, Upgrader
from proxy.worker import SPEC_ENV, WorkerSpec, channel_path
from proxy.workerctl import (
    Abort,
    ControlError,
    Failed,
    PeerReady,
    Poll,
    Ready,
    Release,
    Released,
    Report,
    Serve,
    SuccessorLost,
)
from proxy.workerctl import (
    Serving as ServingMsg,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
SUCCESSOR_EXIT_WAIT = 1.0  # a new supervisor whose worker died: is it gone too?
POLL_WAIT = 1.0  # a scrape waits this long for a worker's fresh numbers, else uses its last ones
STOP_GRACE = 5.0  # after drain_timeout, how long workers get before SIGKILL
GATE_SHARE = 0.75  # of upgrade_timeout after the new supervisor's READY: the gate's deadline


class StartError(Exception):
    """Workers could not be started (the reason names the worker and why)."""


@dataclass(eq=False)
class Handle:
    """One worker process, as its supervisor sees it."""

    index: int
    proc: trio.Process
    link: ControlLink
    started: float
    ready: trio.Event = field(default_factory=trio.Event)
    serving: trio.Event = field(default_factory=trio.Event)
    told: bool = False  # SERVE went out to it: it belongs to a serving generation
    exited: trio.Event = field(default_factory=trio.Event)
    failed: str = ""
    gating: bool = False  # an old worker whose successor waits for our RELEASE
    answer: trio.Event = field(default_factory=trio.Event)  # to RELEASE: released or not
    released: bool = False
    base: dict[str, list[Any]] = field(default_factory=dict)  # its RELEASED's, for `carried`
    report: Report | None = None
    seen: float = 0.0  # when it last answered a poll
    seq: int = 0
    polled: trio.Event = field(default_factory=trio.Event)
    hung: bool = False


class Pool:
    """The generation's workers: spawn, control, heartbeat, restart, metrics, upgrade gates."""

    def __init__(self, cfg: Config, metrics: Metrics, server: Server,
                 spawn: Callable[..., Any]) -> None:
        self.cfg, self.metrics, self.server, self.spawn = cfg, metrics, server, spawn
        self.size = cfg.proxy.workers
        self.generation = 1
        self.handles: dict[int, Handle] = {}
        self.channels: dict[int, socket.socket] = {}  # our workers' channels, by index
        self.stale: list[Path] = []  # the previous generation's channels we have no worker for
        self.changed = trio.lowlevel.ParkingLot()
        self.loads, self._loads_fd = Loads.create(self.size)
        self.committed = False  # RELEASE went out: this generation's workers wind down
        self.started = trio.Event()  # serve_all() ran: this generation serves
        self.stopping = False
        self._seq = 0
        self.successor_pid: Callable[[], int] = lambda: 0  # whom the generation released to

    # ---- channels ------------------------------------------------------------------------------

    def bind_channels(self) -> None:
        for k in range(self.size):
            path = channel_path(self.cfg.proxy.takeover_socket, k)
            path.unlink(missing_ok=True)  # a channel of a generation no longer serving
            self.channels[k] = bind_channel(path)

    def adopt_channels(self, kept: dict[str, socket.socket]) -> list[str]:
        """Take the previous generation's worker channels; returns their paths by old index."""
        old: list[str] = sorted((k.split("@", 1)[1] for k in kept),
                                key=lambda p: int(p.rsplit(".w", 1)[1]))
        for key, sock in kept.items():
            path = key.split("@", 1)[1]
            k = int(path.rsplit(".w", 1)[1])
            if k < self.size and Path(path) == channel_path(self.cfg.proxy.takeover_socket, k):
                sock.setblocking(False)
                self.channels[k] = sock
            else:
                sock.close()
                self.stale.append(Path(path))
        for k in range(self.size):
            if k not in self.channels:
                fresh = channel_path(self.cfg.proxy.takeover_socket, k)
                fresh.unlink(missing_ok=True)
                self.channels[k] = bind_channel(fresh)
        return old

    def extra_sockets(self) -> dict[str, socket.socket]:
        """Sent with LISTENERS: the next supervisor learns our workers' channels from these."""
        return {f"{WORKER_CHANNEL}@{channel_path(self.cfg.proxy.takeover_socket, k)}": s
                for k, s in self.channels.items()}

    def remove_stale(self) -> None:
        for path in self.stale:
            path.unlink(missing_ok=True)
        self.stale.clear()

    def close_channels(self, unlink: bool) -> None:
        for k, sock in self.channels.items():
            sock.close()
            if unlink:
                channel_path(self.cfg.proxy.takeover_socket, k).unlink(missing_ok=True)

    # ---- workers -------------------------------------------------------------------------------

    async def start_all(self, peers: list[str]) -> None:
        """Spawn every worker (worker k takes the old workers j with j % size == k) and wait
        until each is ready. Raises StartError (and kills what it started)."""
        try:
            for k in range(self.size):
                await self._spawn(k, tuple(p for j, p in enumerate(peers) if j % self.size == k))
            with trio.move_on_after(self.cfg.proxy.upgrade_timeout):
                for h in list(self.handles.values()):
                    await _first(h.ready.wait, h.exited.wait)
                    if not h.ready.is_set():
                        why = h.failed or f"exited with status {h.proc.returncode}"
                        raise StartError(f"worker {h.index} failed to start: {why}")
                return
            late = [h.index for h in self.handles.values() if not h.ready.is_set()]
            raise StartError(f"workers {late} not ready within "
                             f"upgrade_timeout={self.cfg.proxy.upgrade_timeout}s")
        except BaseException:
            self.kill_all()
            raise

    async def _spawn(self, k: int, peers: tuple[str, ...]) -> Handle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners = {key: s.fileno() for key, s in self.server.listener_sockets().items()
                     if not key.startswith(METRICS_LISTENER + "@")}
        spec = WorkerSpec(k, self.generation, theirs.fileno(), listeners,
                          self.channels[k].fileno(), peers, self._loads_fd, self.size)
        fds = [theirs.fileno(), self.channels[k].fileno(), self._loads_fd, *listeners.values()]
        self.loads.clear(k)
        env = {**os.environ, SPEC_ENV: spec.to_env()}
        real = os.environ.get(STDERR_FD_ENV)
        if real is not None and real.isdigit():
            fds.append(int(real))  # so the worker's logs outlive our predecessor's pipe too
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.cfg.path),
                 "--worker", str(k)], stdin=subprocess.DEVNULL, pass_fds=fds, env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        h = Handle(k, proc, ControlLink(ours), time.monotonic())
        h.seen = h.started
        self.handles[k] = h
        log.info("worker_spawned", worker=k, worker_pid=proc.pid, peers=len(peers))
        self.spawn(self._read, h)
        self.spawn(self._watch, h)
        return h

    async def _read(self, h: Handle) -> None:
        try:
            while True:
                msg = await h.link.receive()
                if msg is None:
                    break
                if isinstance(msg, Report):
                    h.report, h.seen = msg, time.monotonic()
                    if msg.seq >= h.seq:
                        h.polled.set()
                elif isinstance(msg, Ready):
                    h.ready.set()
                elif isinstance(msg, ServingMsg):
                    h.serving.set()
                elif isinstance(msg, SuccessorLost):
                    self.spawn(self._successor_lost, h)
                elif isinstance(msg, PeerReady):
                    h.gating = True
                elif isinstance(msg, Released):
                    h.gating, h.released, h.base = False, True, msg.metrics
                    h.answer.set()
                elif isinstance(msg, Abort | Failed):
                    h.gating = False
                    if isinstance(msg, Failed):
                        h.failed = msg.reason
                    h.answer.set()
                self.changed.unpark_all()
        except ControlError as exc:
            log.error("worker_control_garbage", worker=h.index, error=str(exc))
            with contextlib.suppress(ProcessLookupError):
                h.proc.kill()

    async def _watch(self, h: Handle) -> None:
        """Hold the generation while the worker lives; restart it if it dies while serving."""
        with self.server.working():
            await h.proc.wait()
        # A worker that said READY belongs to the generation even before SERVE reaches it: if
        # it dies then, the generation must not serve one worker short for good.
        replace = (self.handles.get(h.index) is h and _belongs(h) and not self.committed
                   and not self.stopping)
        died = replace and not (h.released and h.proc.returncode == 0)
        # Released generation, a worker that never sent RELEASED (it failed at the commit and
        # finished what it held, or died): no session carries its counts, so they join ours and
        # the generation session's DONE carries them (else they would leave every sum).
        unreleased = self.committed and not h.released
        lost = 0
        if (died or unreleased) and h.report is not None:
            # What it counted stays counted: its last numbers join the supervisor's own (before
            # `exited` drops its report from the sum, so a scrape never sees a dip).
            with contextlib.suppress(ValueError):
                self.metrics.restore(h.report.metrics)
            lost = int(sum(h.report.active.values())) if died else 0
        h.exited.set()
        h.link.close()
        self.changed.unpark_all()
        if not replace:
            log.info("worker_exited", worker=h.index, worker_pid=h.proc.pid,
                     status=h.proc.returncode)
            return
        if not died:
            # It handed everything to a successor whose generation then died: we serve again
            # (serve_again), so its place is filled; nothing was lost.
            log.info("worker_exited", worker=h.index, worker_pid=h.proc.pid, status=0)
        else:
            reason = "hung" if h.hung else "died"
            self.metrics.worker_restarts.labels(reason).inc()
            self.metrics.worker_lost_connections.labels().inc(lost)
            log.error("worker_died", worker=h.index, worker_pid=h.proc.pid,
                      status=h.proc.returncode, reason=reason, lost_connections=lost)
        await self.started.wait()  # (a new generation: replaced once it serves, if it does)
        if not self.committed and not self.stopping:
            await self._replace(h.index)

    async def _replace(self, index: int) -> None:
        try:
            new = await self._spawn(index, ())
            with trio.move_on_after(self.cfg.proxy.upgrade_timeout):
                await _first(new.ready.wait, new.exited.wait)
            if new.ready.is_set() and (self.committed or self.stopping):
                # The generation was released (or stops) while this one started: it must not
                # accept in a generation that no longer serves.
                log.info("worker_restart_dropped", worker=index, worker_pid=new.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    new.proc.send_signal(signal.SIGTERM)
            elif new.ready.is_set():
                new.told = True
                await new.link.send(Serve())
                log.info("worker_restarted", worker=index, worker_pid=new.proc.pid)
            else:
                log.error("worker_restart_failed", worker=index, reason=new.failed)
                with contextlib.suppress(ProcessLookupError):
                    new.proc.kill()
        except OSError as exc:
            log.error("worker_restart_failed", worker=index, reason=str(exc))

    def serve_again(self) -> None:
        """The generation we released to died: we serve again. Workers that already handed
        everything over and exited are replaced; the others are told to serve on when they
        ask (SUCCESSOR_LOST), or replaced when they exit."""
        self.committed = False
        for k, h in list(self.handles.items()):
            if h.exited.is_set():
                self.spawn(self._replace, k)

    async def _successor_lost(self, h: Handle) -> None:
        """An old worker's successor died after RELEASED: it serves on only if the whole new
        generation is gone (else the new supervisor replaces that worker, and ours finishes)."""
        pid = self.successor_pid()
        gone = pid == 0 or await pidfile.wait_gone(pid, SUCCESSOR_EXIT_WAIT)
        if gone:
            self.committed = False
            h.released = False
        await h.link.send(Serve() if gone else Abort("the new generation serves on"))
        log.info("worker_successor_lost", worker=h.index, serve_on=gone)

    async def heartbeat(self) -> None:
        """Poll every worker; one that answers nothing for worker_timeout is replaced."""
        interval = min(1.0, self.cfg.proxy.worker_timeout / 4)
        while True:
            await self.poll()
            now = time.monotonic()
            for h in list(self.handles.values()):
                if (_belongs(h) and not h.exited.is_set() and not h.hung
                        and now - h.seen > self.cfg.proxy.worker_timeout):
                    h.hung = True
                    log.error("worker_hung", worker=h.index, worker_pid=h.proc.pid,
                              silent_s=round(now - h.seen, 1))
                    with contextlib.suppress(ProcessLookupError):
                        h.proc.kill()
            await trio.sleep(interval)

    async def poll(self, wait: float = 0.0) -> None:
        self._seq += 1
        live = [h for h in self.handles.values() if not h.exited.is_set()]
        for h in live:
            if h.seq and not h.polled.is_set():
                # Its last POLL is unanswered: one outstanding at a time, else a worker that
                # does not read (stopped, loop blocked) fills its control socket and every
                # later send (heartbeat, scrape, RELEASE) blocks for good.
                continue
            h.seq, h.polled = self._seq, trio.Event()
            await h.link.send(Poll(self._seq))
        if wait:
            with trio.move_on_after(wait):
                for h in live:
                    await _first(h.polled.wait, h.exited.wait)

    async def render(self) -> bytes:
        """/metrics: our own counters (upgrades, workers that died) plus every worker's."""
        await self.poll(POLL_WAIT)
        agg = Metrics(generation=self.generation, version=__version__)
        agg.workers.labels().set(self.size)
        agg.restore(self.metrics.snapshot())
        for fam, src in ((agg.phase, self.metrics.phase),):
            for lv, child in src.children.items():
                fam.labels(*lv).set(child.value)
        for h in self.handles.values():
            if h.report is None or h.exited.is_set():
                continue
            try:
                agg.restore(h.report.metrics)
            except ValueError as exc:
                log.warning("worker_metrics_bad", worker=h.index, error=str(exc))
                continue
            agg.add_active(h.report.active)
            agg.worker_connections.labels(str(h.index)).set(sum(h.report.active.values()))
        agg.extra = list(_per_worker_process(
            {h.index: h.report.process for h in self.handles.values()
             if h.report is not None and not h.exited.is_set()}))
        return agg.render()

    async def serve_all(self) -> None:
        """The generation serves: SERVE to every worker; back when each serves (or timeout)."""
        self.started.set()
        for h in list(self.handles.values()):
            h.told = True
            await h.link.send(Serve())
        with trio.move_on_after(self.cfg.proxy.upgrade_timeout):
            for h in list(self.handles.values()):
                await _first(h.serving.wait, h.exited.wait)

    def kill_all(self) -> None:
        for h in self.handles.values():
            if h.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    h.proc.kill()

    def signal_all(self, sig: int) -> None:
        for h in self.handles.values():
            if h.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    h.proc.send_signal(sig)

    async def wait_all_exited(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            for h in list(self.handles.values()):
                await h.exited.wait()
            return True
        return False

    # ---- the old side's upgrade hooks ----------------------------------------------------------

    async def gate(self, ch: Channel) -> None:
        """The new supervisor said READY: once every old worker's successor did too, RELEASE
        them all. Raises SessionFailed (a rollback) while nothing is released yet."""
        live = [h for h in self.handles.values() if not h.exited.is_set()]
        # One deadline for the whole gate, inside the new supervisor's: it waits for RELEASED
        # upgrade_timeout from its READY, and gives up (with its workers) after that.
        deadline = trio.current_time() + GATE_SHARE * self.cfg.proxy.upgrade_timeout
        with trio.move_on_at(deadline):
            while not all(h.gating or h.exited.is_set() for h in live):
                await self.changed.park()
        waiting = [h.index for h in live if not h.gating]
        if waiting:
            raise SessionFailed(f"old workers {waiting}: no successor waits at READY")
        # The commit point: from here the generation is handed over, whatever else happens.
        self.committed = True
        for h in live:
            h.answer, h.released, h.base = trio.Event(), False, {}
            await h.link.send(Release())
        with trio.move_on_at(deadline):
            for h in live:
                await _first(h.answer.wait, h.exited.wait)
        for h in live:
            if not h.released and not h.exited.is_set():
                # Its session broke at the last moment: it serves on, alone, in an old
                # generation. It stops accepting and finishes what it holds.
                log.error("worker_handover_failed", worker=h.index, reason=h.failed or "no answer")
                with contextlib.suppress(ProcessLookupError):
                    h.proc.send_signal(signal.SIGTERM)
        log.info("workers_released", released=sum(h.released for h in live), workers=len(live))

    def carried(self) -> dict[str, list[Any]]:
        """The counters of every old worker that released, as each one's RELEASED base held
        them: our RELEASED carries them to the new supervisor (upgrade.Hooks.carried), which
        keeps them itself, so they never depend on one new worker staying alive and prompt."""
        return merged(*(h.base for h in self.handles.values() if h.released))

    def rolled_back(self, reason: str) -> None:
        # (Also after the commit, if the gate was cut short: a graceful stop, the new
        # supervisor's death. Workers that handed over and exited are replaced; those whose
        # successor dies with it ask SUCCESSOR_LOST and serve on.)
        was = self.committed
        self.committed = False
        for k, h in list(self.handles.items()):
            h.gating = False
            if not h.exited.is_set():
                self.spawn(h.link.send, Abort(reason))
            elif was and not self.stopping:
                self.spawn(self._replace, k)


# prometheus-client's process_* families, per worker: (sample name, our family, kind)
_PROCESS = (("process_cpu_seconds_total", "proxy_worker_process_cpu_seconds", "counter"),
            ("process_resident_memory_bytes", "proxy_worker_process_resident_memory_bytes",
             "gauge"),
            ("process_open_fds", "proxy_worker_process_open_fds", "gauge"),
            ("process_start_time_seconds", "proxy_worker_process_start_time_seconds", "gauge"))


def _per_worker_process(reports: dict[int, dict[str, float]]) -> Iterator[Metric]:
    for sample, name, kind in _PROCESS:
        fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            name, f"The worker's {sample}.", labels=["worker"])
        for k, process in sorted(reports.items()):
            if sample in process:
                fam.add_metric([str(k)], process[sample])
        yield fam


def _belongs(h: Handle) -> bool:
    """Part of its generation's service: told SERVE, or READY and waiting for it (a worker
    that dies or hangs then is replaced, not forgotten)."""
    return h.told or h.serving.is_set() or h.ready.is_set()


async def _first(*waits: Callable[[], Any]) -> None:
    """Return when the first of these waits returns."""
    async with trio.open_nursery() as nursery:
        async def one(w: Callable[[], Any]) -> None:
            await w()
            nursery.cancel_scope.cancel()

        for w in waits:
            nursery.start_soon(one, w)


async def run(cfg: Config, argv: list[str], takeover: bool) -> int:
    """`python -m proxy run` when `[proxy] workers` > 1: see the module docstring."""
    from proxy.generation import StartupError

    metrics = Metrics(generation=1, version=__version__)
    metrics.workers.labels().set(cfg.proxy.workers)
    server = Server(cfg, metrics)
    server.accept_traffic = False
    exit_now = trio.Event()
    code = EXIT_OK
    takeover_scope = trio.CancelScope()
    notify.title("generation ? starting")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as sigs:
        async with trio.open_nursery() as root:
            pool = Pool(cfg, metrics, server, root.start_soon)
            server.metrics_handler = partial(metrics_http.serve_conn, pool.render,
                                             server.working)
            await root.start(server.host_handlers)
            hooks = Hooks(gate=pool.gate, rolled_back=pool.rolled_back,
                          extra_sockets=pool.extra_sockets, serving_again=pool.serve_again,
                          carried=pool.carried,
                          committed=lambda: pool.committed)
            upgrader = Upgrader(cfg, server, metrics, argv, root.start_soon, exit_now, hooks)
            pool.successor_pid = lambda: upgrader.successor_pid

            def on_channel(sock: socket.socket) -> None:
                root.start_soon(upgrader.serve_channel, sock)

            async def serving(s: Serving) -> None:
                await pool.serve_all()
                root.start_soon(server.accept_all)  # /metrics: every worker's numbers are in
                log.info("workers_serving", workers=pool.size)

            def on_serving(s: Serving) -> None:
                pool.generation = s.generation
                log.set_generation(s.generation)
                root.start_soon(serving, s)
                if s.channel is not None:
                    on_channel(s.channel)
                pidfile.write(cfg.proxy.pidfile)
                notify.title(f"generation {s.generation} serving ({pool.size} workers)")
                upgrader.set_phase(Phase.SERVING, version=__version__, workers=pool.size)
                upgrader.became_serving(s.generation, s.upgrade_pending)
                notify.notify(f"MAINPID={os.getpid()}", "READY=1")

            def on_abort(reason: str) -> None:
                nonlocal code
                code = EXIT_FAILED
                pool.kill_all()
                exit_now.set()

            async def stop(hard: bool) -> None:
                nonlocal code
                if hard:
                    code = EXIT_INTERRUPTED
                    log.warning("stop_now")
                    pool.signal_all(signal.SIGINT)  # they had SIGTERM: a second signal is hard
                    exit_now.set()
                    return
                was_serving = upgrader.serving
                pool.stopping = True
                server.stop_accepting()
                takeover_scope.cancel()
                await upgrader.stop()
                if sigdispatch.forward_if_released(upgrader, signal.SIGTERM):
                    return  # (an attempt past its commit went through: the stop is theirs)
                pool.signal_all(signal.SIGTERM)  # each closes its copies and drains
                server.close_listeners()  # ours too: from here connects are refused
                upgrader.set_phase(Phase.DRAINING)
                notify.title(f"generation {pool.generation} draining")
                drained = await pool.wait_all_exited(cfg.proxy.drain_timeout + STOP_GRACE)
                if not drained:
                    pool.kill_all()
                mine = was_serving and pidfile.read(cfg.proxy.pidfile) in (None, os.getpid())
                if mine:
                    cfg.proxy.takeover_socket.unlink(missing_ok=True)
                pool.close_channels(unlink=mine)
                log.info("stopped", drained=drained)
                pidfile.remove_if_mine(cfg.proxy.pidfile)
                exit_now.set()


            async def prepare(kept: dict[str, socket.socket]) -> None:
                """Between LISTENERS and READY: our workers, each with its old peers."""
                if not kept:
                    raise TakeoverRefused(
                        "the serving generation announces no worker channel (a release before "
                        "workers): upgrade it to this release with workers = 1 first")
                # (take_over has read WELCOME: the gauge holds our generation's number)
                pool.generation = int(metrics.generation.labels().value)
                try:
                    old = pool.adopt_channels(kept)
                    await pool.start_all(old)
                except (StartError, OSError) as exc:
                    raise TakeoverRefused(str(exc)) from exc

            async def taking_over(task_status: trio.TaskStatus[int]) -> None:
                with takeover_scope:
                    await take_over(cfg, server, metrics, on_serving, on_channel, on_abort,
                                    task_status=task_status, opts=Options(before_ready=prepare))
                pool.remove_stale()

            root.start_soon(sigdispatch.dispatch, sigs, upgrader,
                            lambda hard: root.start_soon(stop, hard))
            root.start_soon(pool.heartbeat)
            try:
                if takeover:
                    notify.title("generation ? taking over")
                    await root.start(taking_over)
                else:
                    chan = bind_channel(cfg.proxy.takeover_socket)
                    server.open_listeners({})
                    pool.bind_channels()
                    await pool.start_all([])
                    on_serving(Serving(1, False, chan))
            except (OSError, TakeoverRefused, StartError) as exc:
                raise StartupError(str(exc)) from exc
            await exit_now.wait()
            root.cancel_scope.cancel()
    log.info("exit", code=code)
    return code
