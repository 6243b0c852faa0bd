"""One generation from start to exit: signals, first start or takeover, pidfile, graceful stop.

`run()` is what `python -m proxy run` executes. It opens the signal receiver first (so a SIGTERM
during start-up is a graceful stop, not a crash), then either binds everything (first
generation) or takes over from the generation serving on the takeover channel (`adopt.py`),
then serves until a graceful stop or until it has handed everything to the next generation
(`upgrade.py`). SIGUSR2 goes to `Upgrader.request_upgrade()`, which never drops one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from functools import partial

import trio

from proxy import __version__, log, metrics_http, migrate, notify, pidfile
from proxy.adopt import Serving, TakeoverRefused, take_over
from proxy.channel import bind_channel
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.server import Server
from proxy.upgrade import Phase, Upgrader

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """The generation could not start (its cause is in the message); the CLI exits 1."""


async def run(cfg: Config, argv: list[str], takeover: bool) -> int:
    metrics = Metrics(generation=1, version=__version__)
    server = Server(cfg, metrics)
    server.metrics_handler = partial(metrics_http.serve_conn, metrics, server.working)
    exit_now = trio.Event()
    code = EXIT_OK
    stop_requested = False
    takeover_scope = trio.CancelScope()
    notify.title("generation ? starting")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as sigs:
        async with trio.open_nursery() as root:
            await root.start(server.host_handlers)
            upgrader = Upgrader(cfg, server, metrics, argv, root.start_soon, exit_now)
            migrate.install(cfg, server, metrics, upgrader, exit_now)  # host migration (issue 11)

            def on_channel(sock: socket.socket) -> None:
                root.start_soon(upgrader.serve_channel, sock)

            def on_serving(s: Serving) -> None:
                root.start_soon(server.accept_all)
                if s.channel is not None:
                    on_channel(s.channel)
                pidfile.write(cfg.proxy.pidfile)
                notify.title(f"generation {s.generation} serving")
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
                upgrader.set_phase(Phase.DRAINING, connections=len(server.conns))
                notify.title(f"generation {upgrader.generation} draining")
                server.stop_accepting()
                takeover_scope.cancel()  # a takeover in progress ABORTs (before or after RELEASED)
                await upgrader.stop()
                server.stop_accepting()  # a rollback may have restarted accepting
                server.close_listeners()
                server.close_idle()
                if was_serving and pidfile.read(cfg.proxy.pidfile) in (None, os.getpid()):
                    cfg.proxy.takeover_socket.unlink(missing_ok=True)
                drained = await server.drain(cfg.proxy.drain_timeout)
                log.info("stopped", drained=drained, left=len(server.conns))
                pidfile.remove_if_mine(cfg.proxy.pidfile)
                exit_now.set()

            async def signals() -> None:
                nonlocal stop_requested
                async for sig in sigs:
                    if sig == signal.SIGUSR2:
                        upgrader.request_upgrade()
                    elif stop_requested:
                        if sig == signal.SIGINT:
                            root.start_soon(stop, True)
                    elif upgrader.successor_pid and not upgrader.serving:
                        # Sent to the serving generation, it reached us just after we released:
                        # the service is to stop, and the service is our successor now. We
                        # finish handing over and exit as usual.
                        stop_requested = True
                        log.info("stop_forwarded", signal=signal.Signals(sig).name,
                                 to_pid=upgrader.successor_pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(upgrader.successor_pid, sig)
                    else:
                        stop_requested = True
                        log.info("stop_requested", signal=signal.Signals(sig).name)
                        root.start_soon(stop, False)

            async def taking_over(task_status: trio.TaskStatus[int]) -> None:
                with takeover_scope:
                    await take_over(cfg, server, metrics, on_serving, on_channel, on_abort,
                                    task_status=task_status)

            root.start_soon(signals)
            root.start_soon(server.sweep_idle)
            try:
                if takeover:
                    notify.title("generation ? taking over")
                    await root.start(taking_over)
                else:
                    chan = bind_channel(cfg.proxy.takeover_socket)
                    server.open_listeners({})
                    on_serving(Serving(1, False, chan))
            except (OSError, TakeoverRefused) as exc:
                raise StartupError(str(exc)) from exc
            await exit_now.wait()
            root.cancel_scope.cancel()
    log.info("exit", code=code)
    return code
