"""One generation from start to exit: signals, first start or takeover, pidfile, graceful stop.

`run()` is what `python -m proxy run` executes. It opens the signal receiver first (so a SIGTERM
during start-up is a graceful stop, not a crash), then either binds everything (first
generation) or takes over from the generation serving on the takeover channel (`adopt.py`),
then serves until a graceful stop or until it has handed everything to the next generation
(`upgrade.py`). SIGUSR2 goes to `Upgrader.request_upgrade()`, which never drops one.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from proxy import __version__, log, metrics_http, migrate, notify, pidfile, sigdispatch
from proxy.adopt import (
    WORKER_CHANNEL,
    Options,
    Serving,
    TakeoverRefused,
    adopt_stderr,
    take_over,
)
from proxy.channel import Channel, bind_channel
from proxy.config import Config
from proxy.faults import fault_point
from proxy.localworker import LocalGate
from proxy.metrics import Metrics
from proxy.server import Server
from proxy.upgrade import Hooks, Phase, SessionFailed, Upgrader
from proxy.worker import GateClosed, WorkerLink, WorkerSpec, channel_path
from proxy.workerctl import Failed, Ready, Released, Report
from proxy.workerctl import Serving as ServingMsg

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """The generation could not start (its cause is in the message); the CLI exits 1."""


async def run(cfg: Config, argv: list[str], takeover: bool, spec: WorkerSpec | None = None
              ) -> int:
    """One generation (`spec` None), or one worker of a supervised generation (`worker.py`)."""
    if spec is not None:
        cfg = dataclasses.replace(cfg, metrics=None)  # the supervisor hosts /metrics
        log.set_worker(spec.index)
        log.set_generation(spec.generation)
    metrics = Metrics(generation=spec.generation if spec else 1, version=__version__)
    server = Server(cfg, metrics)
    server.metrics_handler = partial(metrics_http.serve_conn, metrics.render_async, server.working)
    link = (WorkerLink(socket.socket(fileno=spec.control_fd),
                       lambda seq: Report(seq, metrics.snapshot(), metrics.active(),
                                          Metrics.process_samples()))
            if spec is not None else None)
    exit_now = trio.Event()
    code = EXIT_OK
    takeover_scope = trio.CancelScope()
    notify.title("generation ? starting")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as sigs:
        async with trio.open_nursery() as root:
            await root.start(server.host_handlers)
            hooks = None
            if link is not None:
                passed = False  # our supervisor said RELEASE; RELEASED has not gone out yet

                async def gate(ch: Channel) -> None:
                    nonlocal passed
                    try:
                        await link.gate(ch.sock, cfg.proxy.upgrade_timeout)
                    except GateClosed as exc:
                        raise SessionFailed(str(exc)) from None
                    passed = True

                async def released(base: dict[str, list[Any]]) -> None:
                    nonlocal passed
                    passed = False
                    await link.send(Released(base))

                def rolled_back(reason: str) -> None:
                    # The session broke after RELEASE, before RELEASED went out (the successor
                    # died at that moment): our supervisor waits for our answer, and must not
                    # wait out upgrade_timeout while the other workers stopped accepting.
                    nonlocal passed
                    if passed:
                        passed = False
                        root.start_soon(link.send, Failed(f"handover failed: {reason}"))

                async def successor_lost() -> bool:
                    return await link.successor_lost(2 * cfg.proxy.upgrade_timeout)

                hooks = Hooks(worker=True, gate=gate, released=released,
                              successor_lost=successor_lost, rolled_back=rolled_back)
            # A single process is also its own worker 0 (localworker.py): a second Upgrader
            # serves <takeover_socket>.w0, where a protocol-4 successor takes our connections.
            local = LocalGate(cfg.proxy.upgrade_timeout)
            w0_path = channel_path(cfg.proxy.takeover_socket, 0)
            w0: list[socket.socket] = []  # its listening socket, once we have it
            w0_exit = trio.Event()  # that Upgrader handed over everything (or gave up)

            async def w0_successor_lost() -> bool:
                # Serve on only if the generation we released to is gone (as a supervisor
                # decides for its workers: supervisor.Pool._successor_lost).
                pid = upgrader.successor_pid
                return pid == 0 or await pidfile.wait_gone(pid, 1.0)

            w0_upgrader = Upgrader(cfg, server, metrics, argv, root.start_soon, w0_exit, Hooks(
                worker=True, gate=local.worker_gate, released=local.worker_released,
                local_worker=True, successor_lost=w0_successor_lost))
            if spec is None:
                hooks = Hooks(gate=local.generation_gate, rolled_back=local.rolled_back,
                              carried=local.carried, committed=local.is_committed,
                              extra_sockets=lambda: {f"{WORKER_CHANNEL}@{w0_path}": w0[0]},
                              via_workers=w0_exit.wait)
            upgrader = Upgrader(cfg, server, metrics, argv, root.start_soon, exit_now, hooks)
            if spec is None:  # a worker holds no addresses of its own: its supervisor would
                migrate.install(cfg, server, metrics, upgrader, exit_now)  # (issue 11)

            def on_channel(sock: socket.socket) -> None:
                root.start_soon(upgrader.serve_channel, sock)

            def on_serving(s: Serving) -> None:
                root.start_soon(server.accept_all)
                if s.channel is not None:
                    on_channel(s.channel)
                if spec is not None:
                    notify.title(f"generation {s.generation} worker {spec.index} serving")
                    upgrader.set_phase(Phase.SERVING, version=__version__)
                    upgrader.became_serving(s.generation, False)
                    return
                pidfile.write(cfg.proxy.pidfile)
                notify.title(f"generation {s.generation} serving")
                if not w0:  # (taken over from a generation without one)
                    w0_path.unlink(missing_ok=True)
                    w0.append(bind_channel(w0_path))
                w0_upgrader.became_serving(s.generation, False)
                root.start_soon(w0_upgrader.serve_channel, w0[0])
                upgrader.set_phase(Phase.SERVING, version=__version__)
                upgrader.became_serving(s.generation, s.upgrade_pending)
                # Last: whoever waits for READY (systemd) finds everything above done.
                notify.notify(f"MAINPID={os.getpid()}", "READY=1")

            def on_abort(reason: str) -> None:
                nonlocal code
                code = EXIT_FAILED
                exit_now.set()

            async def stop(hard: bool) -> None:
                nonlocal code
                if hard:
                    code = EXIT_INTERRUPTED
                    log.warning("stop_now")
                    exit_now.set()
                    return
                was_serving = upgrader.serving
                server.stop_accepting()
                takeover_scope.cancel()  # a takeover in progress ABORTs (before or after RELEASED)
                await upgrader.stop()
                if sigdispatch.forward_if_released(upgrader, signal.SIGTERM):
                    return  # (an attempt past its commit went through: the stop is theirs)
                await w0_upgrader.stop()
                server.stop_accepting()  # a rollback may have restarted accepting
                server.close_listeners()
                # (logged once the listeners are closed: from this line on, connects are refused)
                upgrader.set_phase(Phase.DRAINING, connections=len(server.conns))
                notify.title(f"generation {upgrader.generation} draining")
                server.close_idle()
                if (spec is None and was_serving
                        and pidfile.read(cfg.proxy.pidfile) in (None, os.getpid())):
                    cfg.proxy.takeover_socket.unlink(missing_ok=True)
                    w0_path.unlink(missing_ok=True)
                drained = await server.drain(cfg.proxy.drain_timeout)
                log.info("stopped", drained=drained, left=len(server.conns))
                if spec is None:
                    pidfile.remove_if_mine(cfg.proxy.pidfile)
                exit_now.set()


            stale: list[Path] = []

            async def from_workers(kept: dict[str, socket.socket]) -> None:
                """The serving generation has workers: take each one's connections over its
                own session, as a new worker would (they all arrive here)."""
                paths = sorted(key.split("@", 1)[1] for key in kept)
                for key, s in kept.items():
                    if key == f"{WORKER_CHANNEL}@{w0_path}":
                        w0.append(s)  # ours to serve from now on (the same path)
                    else:
                        s.close()
                for path in paths:
                    await root.start(_peer_session, cfg, server, metrics, path,
                                     lambda s: None, lambda reason: None)
                stale.extend(Path(p) for p in paths if Path(p) != w0_path)

            async def taking_over(task_status: trio.TaskStatus[int]) -> None:
                with takeover_scope:
                    await take_over(cfg, server, metrics, on_serving, on_channel, on_abort,
                                    task_status=task_status,
                                    opts=Options(before_ready=from_workers))
                for path in stale:  # channels of workers that no longer exist
                    path.unlink(missing_ok=True)

            root.start_soon(sigdispatch.dispatch, sigs, upgrader,
                            lambda hard: root.start_soon(stop, hard), spec is not None)
            root.start_soon(server.sweep_idle)
            try:
                if spec is not None and link is not None:
                    await _worker_start(cfg, spec, link, server, metrics, root, on_serving,
                                        on_abort, stop)
                elif takeover:
                    notify.title("generation ? taking over")
                    await root.start(taking_over)
                else:
                    chan = bind_channel(cfg.proxy.takeover_socket)
                    w0_path.unlink(missing_ok=True)  # (no generation serves: chan says so)
                    w0.append(bind_channel(w0_path))
                    server.open_listeners({})
                    on_serving(Serving(1, False, chan))
            except (OSError, TakeoverRefused) as exc:
                raise StartupError(str(exc)) from exc
            await exit_now.wait()
            root.cancel_scope.cancel()
    log.info("exit", code=code)
    return code


async def _worker_start(cfg: Config, spec: WorkerSpec, link: WorkerLink, server: Server,
                        metrics: Metrics, root: trio.Nursery,
                        on_serving: Callable[[Serving], None], on_abort: Callable[[str], None],
                        stop: Callable[[bool], Awaitable[None]]) -> None:
    """A worker: open what the supervisor gave us, take connections from our peers (old
    workers), say READY, and serve at SERVE. Raises StartupError before READY."""
    root.start_soon(link.run)
    server.open_listeners(spec.take_listeners())
    server.loads = spec.take_loads()
    channel = spec.take_channel()
    served = False
    settled = 0  # peer sessions that released us or ended
    all_settled = trio.Event()

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled >= len(spec.peers):
            all_settled.set()

    released_to_us = False  # a peer session's RELEASED: its connections come here

    def peer_released(s: Serving) -> None:
        nonlocal released_to_us
        released_to_us = True
        settle()

    def peer_failed(reason: str) -> None:
        if not served:  # before SERVE the generation rolls back: say why, and go
            root.start_soon(link.send, Failed(reason))
            on_abort(reason)
            return
        log.warning("peer_session_failed", reason=reason)
        settle()

    peer_opts: list[Options] = []
    peer_scopes: list[trio.CancelScope] = []

    async def peer(path: str, task_status: trio.TaskStatus[int]) -> None:
        opts = Options(path=Path(path), worker=True)
        peer_opts.append(opts)
        scope = trio.CancelScope()
        peer_scopes.append(scope)
        with scope:
            await _peer_session(cfg, server, metrics, path, peer_released, peer_failed, opts,
                                task_status=task_status)

    try:
        await fault_point(f"worker{spec.index}", "start")
        for path in spec.peers:
            await root.start(peer, path)
    except (OSError, TakeoverRefused) as exc:
        await link.send(Failed(str(exc)))
        raise StartupError(str(exc)) from exc
    if not spec.peers:
        all_settled.set()
    await link.send(Ready())
    async with trio.open_nursery() as wait:
        async def gone() -> None:
            await link.gone.wait()
            wait.cancel_scope.cancel()

        wait.start_soon(gone)
        await link.serve.wait()
        wait.cancel_scope.cancel()
    if not link.serve.is_set() and released_to_us:
        # Our supervisor died after the old workers released to us (a kill -9 at RELEASED):
        # the connections we ACKed are ours alone. We take no more (each peer resumes what we
        # did not ACK, and serves on: its generation serves again), finish ours like any
        # worker whose supervisor is gone, and accept nothing.
        served = True  # (from here a peer session that breaks costs only itself)
        adopt_stderr()
        log.warning("supervisor_lost", before="serve", connections=len(server.conns))
        for opts in peer_opts:
            opts.quit_reason = "the new generation's supervisor is gone"
        for scope in peer_scopes:
            scope.cancel()
        root.start_soon(stop, False)
        return
    if not link.serve.is_set():
        raise StartupError("the supervisor hung up before SERVE")
    served = True
    adopt_stderr()  # our logs must not depend on the previous generation's stderr pipe
    on_serving(Serving(spec.generation, False, channel))

    async def report_serving() -> None:
        with trio.move_on_after(cfg.proxy.upgrade_timeout):
            await all_settled.wait()
        await link.send(ServingMsg())
        await link.gone.wait()  # the supervisor died: stop as if it had said so
        log.warning("supervisor_lost")
        await stop(False)

    root.start_soon(report_serving)


async def _peer_session(cfg: Config, server: Server, metrics: Metrics, path: str,
                        on_released: Callable[[Serving], None], on_failed: Callable[[str], None],
                        opts: Options | None = None,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Take the connections of one old worker (its channel at `path`) into `server`. Started
    once the session said READY; `on_released` at its RELEASED, `on_failed` if it breaks
    before."""
    log.info("peer_session", path=path)
    await take_over(cfg, server, metrics, on_released, lambda s: s.close(), on_failed,
                    task_status=task_status, opts=opts or Options(path=Path(path), worker=True))
