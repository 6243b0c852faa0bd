"""One generation from start to exit: signals, first start or takeover, pidfile, graceful stop.

`run()` is what `python -m proxy run` executes. It opens the signal receiver first (so a SIGTERM
during start-up is a graceful stop, not a crash), then either binds everything (first
generation) or takes over from the generation serving on the takeover channel, then serves until
a graceful stop or until it has handed everything to the next generation.
"""

from __future__ import annotations

import os
import signal
import socket
from functools import partial

import trio

from proxy import __version__, log, metrics_http, notify, pidfile
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.server import Server
from proxy.upgrade import Phase, TakeoverRefused, Upgrader, bind_channel, take_over

EXIT_OK = 0
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """The generation could not start (its cause is in the message); the CLI exits 1."""


def _title(text: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - setproctitle is a dependency; titles are cosmetic
        return
    setproctitle.setproctitle(f"proxy: {text}")


async def run(cfg: Config, argv: list[str], takeover: bool) -> int:
    metrics = Metrics(generation=1, version=__version__)
    server = Server(cfg, metrics)
    server.metrics_handler = partial(metrics_http.serve_conn, metrics, server.working)
    exit_now = trio.Event()
    code = EXIT_OK
    stop_requested = False
    _title("generation ? starting")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as sigs:
        async with trio.open_nursery() as root:
            await root.start(server.host_handlers)
            upgrader = Upgrader(cfg, server, metrics, 1, argv, root.start_soon, exit_now)

            def on_serving(generation: int) -> None:
                root.start_soon(server.accept_all)
                upgrader.generation = generation
                pidfile.write(cfg.proxy.pidfile)
                _title(f"generation {generation} serving")
                upgrader.set_phase(Phase.SERVING, version=__version__)
                # Last: whoever waits for READY (systemd) finds everything above done.
                notify.notify(f"MAINPID={os.getpid()}", "READY=1")

            def on_channel(sock: socket.socket) -> None:
                root.start_soon(upgrader.serve_channel, sock)

            async def stop(hard: bool) -> None:
                nonlocal code
                upgrader.stopping = True
                if hard:
                    code = EXIT_INTERRUPTED
                    log.warning("stop_now")
                    exit_now.set()
                    return
                upgrader.set_phase(Phase.DRAINING, connections=len(server.conns))
                _title(f"generation {upgrader.generation} draining")
                server.stop_accepting()
                if upgrader.session_scope is not None:
                    upgrader.failure = "stopping"
                    upgrader.session_scope.cancel()
                    await upgrader.session_done.wait()
                    server.stop_accepting()  # a rollback may have restarted accepting
                server.close_listeners()
                server.close_idle()
                upgrader.channel_scope.cancel()
                if upgrader.channel_sock is not None and pidfile.read(cfg.proxy.pidfile) in (
                        None, os.getpid()):
                    cfg.proxy.takeover_socket.unlink(missing_ok=True)
                drained = await server.drain(cfg.proxy.drain_timeout)
                log.info("stopped", drained=drained, left=len(server.conns))
                pidfile.remove_if_mine(cfg.proxy.pidfile)
                exit_now.set()

            async def signals() -> None:
                nonlocal stop_requested
                async for sig in sigs:
                    if sig == signal.SIGUSR2:
                        if upgrader.channel_sock is None:
                            log.warning("upgrade_ignored", reason="still taking over")
                        else:
                            root.start_soon(upgrader.upgrade)
                    elif stop_requested:
                        if sig == signal.SIGINT:
                            root.start_soon(stop, True)
                    else:
                        stop_requested = True
                        log.info("stop_requested", signal=signal.Signals(sig).name)
                        root.start_soon(stop, False)

            root.start_soon(signals)
            root.start_soon(server.sweep_idle)
            try:
                if takeover:
                    _title("generation ? taking over")
                    await root.start(take_over, cfg, server, metrics, on_serving, on_channel)
                else:
                    chan = bind_channel(cfg.proxy.takeover_socket)
                    server.open_listeners({})
                    on_serving(1)
                    root.start_soon(upgrader.serve_channel, chan)
            except (OSError, TakeoverRefused) as exc:
                raise StartupError(str(exc)) from exc
            await exit_now.wait()
            root.cancel_scope.cancel()
    log.info("exit", code=code)
    return code
