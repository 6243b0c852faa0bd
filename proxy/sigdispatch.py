"""What each signal means to a generation's entry point (a single process or a supervisor), in
one place. See the README's "Signals and files".

SIGUSR2 -> `Upgrader.request_upgrade()` (never dropped). The first SIGTERM/SIGINT is a graceful
stop, a second SIGINT a hard one. A stop that reaches a generation that has just released (it
was sent to the pidfile's pid a moment too early) is forwarded to the generation it released to:
the service is to stop, and the service is that generation now; we finish handing over and exit
as usual. A worker takes no SIGUSR2 (its supervisor does).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable

from proxy import log
from proxy.upgrade import Upgrader


def forward_if_released(upgrader: Upgrader, sig: int) -> bool:
    """A stop that waited for an attempt past its commit point: if that attempt released, the
    service is the new generation's now, so the stop goes there (True); else it is ours."""
    if not upgrader.successor_pid or upgrader.serving:
        return False
    log.info("stop_forwarded", signal=signal.Signals(sig).name, to_pid=upgrader.successor_pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(upgrader.successor_pid, sig)
    return True


async def dispatch(sigs: AsyncIterator[int], upgrader: Upgrader,
                   start_stop: Callable[[bool], None], worker: bool = False) -> None:
    """Act on signals until cancelled; `start_stop(hard)` begins a stop."""
    stop_requested = False
    async for sig in sigs:
        if sig == signal.SIGUSR2 and worker:
            log.warning("upgrade_ignored", reason="a worker: send SIGUSR2 to the pid in the pidfile")
        elif sig == signal.SIGUSR2:
            upgrader.request_upgrade()
        elif stop_requested:
            if sig == signal.SIGINT:
                start_stop(True)
        elif forward_if_released(upgrader, sig):
            stop_requested = True
        else:
            stop_requested = True
            log.info("stop_requested", signal=signal.Signals(sig).name)
            start_stop(False)
