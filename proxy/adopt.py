"""The hot upgrade's new side: take the listeners and connections, become the serving generation.

`take_over()` runs in a process started with `--takeover`. It connects to the channel, offers
the protocol versions it speaks, takes the listening sockets (binding those it did not inherit,
closing inherited ones its config dropped), says READY, and waits for RELEASED: then it accepts,
writes the pidfile, notifies systemd, restores the metrics and records the upgrade's success
(`on_serving`). Connection batches are adopted as they come: ACK first, then the handlers
start, so an un-ACKed connection was never touched here. DONE ends the session.

Who decides what (never two serving generations):
- Before RELEASED we are not serving. Our own failure (a bad frame, a bind that fails, a
  graceful stop) sends ABORT and we exit; the old generation resumes accepting. If the session
  breaks, we serve only if the old generation's pid is provably gone (its pidfd says so): an
  old generation that hung up on us is rolling back, and we exit.
- From RELEASED on we serve whatever happens to the session: if it breaks we send ABORT, and the
  old generation keeps (or resumes) what it still holds.

Fd ownership: every received fd is owned by its event's `OwnedFds` until a socket object holds
it (`Server.open_listeners`, `Server.adopt`); any error closes the unclaimed ones.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from proxy import __version__, log, pidfile
from proxy.channel import Channel, ChannelError, PeerAborted, connect_channel
from proxy.child import STDERR_FD_ENV
from proxy.config import Config
from proxy.faults import fault_point
from proxy.gcpause import GcPause, gc_paused
from proxy.metrics import Metrics
from proxy.server import TAKEOVER_LISTENER, Server, listener_key
from proxy.takeover import (
    PROTOCOLS,
    Ack,
    Conns,
    Done,
    Hello,
    Listeners,
    OwnedFds,
    ProtocolError,
    Ready,
    Released,
    Role,
    Session,
    Welcome,
)

STOPPING = "stopping"  # our ABORT's reason when a graceful stop cancels the takeover
OLD_EXIT_WAIT = 1.0  # a broken session: how long the old pid gets to show it died
GC_IDLE = 0.2  # no batch for this long: the burst is over, the collector comes back on


class TakeoverRefused(Exception):
    """The new generation could not take over; nothing changed for the old one."""


@dataclass
class Serving:
    """What `on_serving` is told when this generation starts serving."""

    generation: int
    upgrade_pending: bool
    channel: socket.socket | None  # the takeover socket to serve now (None: later, or bind)


WORKER_CHANNEL = "__worker__"  # LISTENERS keys of a supervisor's worker channels: kept aside


@dataclass
class Options:
    """How a generation with workers takes over (the defaults: a single process)."""

    path: Path | None = None  # the channel to connect to (default: takeover_socket)
    worker: bool = False  # a new worker: listeners come from the supervisor; it counts nothing
    # Called between LISTENERS and READY with the sockets kept aside (WORKER_CHANNEL keys): a
    # new supervisor starts its workers there; raising refuses the takeover (nothing changed).
    before_ready: Callable[[dict[str, socket.socket]], Awaitable[None]] | None = None
    kept: dict[str, socket.socket] = field(default_factory=dict)
    quit_reason: str = ""  # set before cancelling: ABORT says this, and that we will not serve


async def take_over(cfg: Config, server: Server, metrics: Metrics,
                    on_serving: Callable[[Serving], None],
                    on_channel: Callable[[socket.socket], None],
                    on_abort: Callable[[str], None],
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                    opts: Options | None = None) -> None:
    """Take over from the generation serving on the channel.

    `task_status.started(generation)` once the listeners are open (a failure before raises
    TakeoverRefused); then `on_serving` at RELEASED, `on_channel(sock)` when the takeover
    socket becomes ours to serve (if not already given to `on_serving`), and `on_abort(reason)`
    when we give up before serving (the caller exits 1). Cancelling it (a graceful stop) ABORTs.
    """
    opts = opts or Options()
    await fault_point("new", "start")
    try:
        sock = connect_channel(opts.path or cfg.proxy.takeover_socket)
    except ChannelError as exc:
        raise TakeoverRefused(str(exc)) from exc
    ch = Channel(sock, Session(Role.NEW), cfg.proxy.upgrade_timeout)
    t = _Takeover(cfg, server, metrics, ch, on_serving, on_channel, on_abort, opts)
    try:
        with gc_paused():
            await t.start(task_status)
        await t.run()
    finally:
        ch.close()


class _Takeover:
    def __init__(self, cfg: Config, server: Server, metrics: Metrics, ch: Channel,
                 on_serving: Callable[[Serving], None],
                 on_channel: Callable[[socket.socket], None],
                 on_abort: Callable[[str], None], opts: Options) -> None:
        self.cfg, self.server, self.metrics, self.ch = cfg, server, metrics, ch
        self.opts = opts
        self.on_serving, self.on_channel, self.on_abort = on_serving, on_channel, on_abort
        self.generation = 0
        self.old_pid = 0
        self.welcome: Welcome | None = None
        self.channel_sock: socket.socket | None = None
        self.serving = False
        self.adopted = 0

    async def start(self, task_status: trio.TaskStatus[int]) -> None:
        """HELLO .. READY. Any failure: ABORT, and TakeoverRefused (nothing started)."""
        ch = self.ch
        try:
            await ch.send(Hello(os.getpid(), __version__, PROTOCOLS))
            welcome, _ = await ch.receive()
            assert isinstance(welcome, Welcome)
            self.welcome, self.old_pid = welcome, welcome.pid
            self.generation = welcome.generation + 1
            log.set_generation(self.generation)
            self.metrics.generation.labels().set(self.generation)
            event, fds = await ch.receive()
            if not isinstance(event, Listeners):
                fds.close()
                raise ProtocolError(f"expected LISTENERS, got {type(event).__name__}")
            with fds:
                inherited = {}
                try:
                    for key in event.keys:
                        inherited[key] = socket.socket(fileno=fds.claim(1)[0])
                except BaseException:
                    for s in inherited.values():
                        s.close()
                    raise
            for key in [k for k in inherited if k.startswith(WORKER_CHANNEL + "@")]:
                self.opts.kept[key] = inherited.pop(key)
            if self.opts.worker:
                for s in inherited.values():  # ours came from the supervisor at spawn
                    s.close()
                inherited = {}
            else:
                self.channel_sock = inherited.pop(
                    listener_key(TAKEOVER_LISTENER, str(self.cfg.proxy.takeover_socket)), None)
            await fault_point("new", "before_ready")
            if not self.opts.worker:
                self.server.open_listeners(inherited)  # closes them all on failure
            if self.opts.before_ready is not None:
                await self.opts.before_ready(self.opts.kept)
        except (ChannelError, ProtocolError, OSError, TakeoverRefused, trio.Cancelled) as exc:
            # Cancelled: a graceful stop before we got anywhere; nothing started, exit 1.
            reason = ("stopped while taking over" if isinstance(exc, trio.Cancelled)
                      else f"takeover failed before ready: {exc}")
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.ch.abort(reason, serving=False)
            if self.channel_sock is not None:
                self.channel_sock.close()
            for s in self.opts.kept.values():
                s.close()
            raise TakeoverRefused(reason) from None if isinstance(exc, trio.Cancelled) else exc
        task_status.started(self.generation)

    async def run(self) -> None:
        """READY .. DONE, adopting connection batches; see the module docstring for who decides
        what when the session breaks."""
        try:
            # While a predecessor still hands over, this generation is not empty (if it is
            # upgraded meanwhile, it waits for that before its own DONE: counts stay exact).
            with self.server.working():
                await self.ch.send(Ready())
                log.info("phase", phase="taking_over", old_pid=self.old_pid,
                         protocol=self.ch.session.version)
                await self._receive_all()
            return
        except trio.Cancelled:
            # (quit_reason: we take nothing more but keep what we hold; the peer then resumes
            # what we did not ACK, and its generation decides who serves: worker.py)
            reason = self.opts.quit_reason or STOPPING
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.ch.abort(reason, serving=self.serving and not self.opts.quit_reason)
            self.server.drop_adopted()  # never ACKed: the old generation resumes them
            raise
        except (ChannelError, ProtocolError, ValueError, OSError) as exc:
            reason = str(exc)
            error = exc
        with trio.CancelScope(shield=True):
            if not isinstance(error, PeerAborted):
                # Before RELEASED this says "I will not serve, I exit": the old generation
                # may have sent RELEASED meanwhile, and takes the service back on this word.
                await self.ch.abort(reason, serving=self.serving)
            self.server.drop_adopted()  # un-ACKed: the old generation resumes them
            if self.serving:
                log.warning("predecessor_session_ended", old_pid=self.old_pid, reason=reason)
                self._give_channel()
                return
            if not self.opts.worker and await pidfile.wait_gone(self.old_pid, OLD_EXIT_WAIT):
                # Nobody else serves: what we hold is all there is. Serve it.
                log.warning("takeover_old_lost", old_pid=self.old_pid, reason=reason)
                self._become_serving(upgrade_pending=False)
                self._give_channel()
                return
        log.error("takeover_aborted", old_pid=self.old_pid, reason=reason)
        self.on_abort(reason)

    async def _receive_all(self) -> None:
        ch = self.ch
        gcp = GcPause()  # see gcpause.GC_NOTE
        gcp.pause()
        try:
            while True:
                # Before RELEASED the old generation answers at once; after it, a batch may
                # wait for a request to finish (up to its drain_timeout), and DONE by then.
                timeout = (self.cfg.proxy.upgrade_timeout if not self.serving
                           else self.cfg.proxy.drain_timeout + self.cfg.proxy.upgrade_timeout)
                with trio.move_on_after(GC_IDLE if gcp.paused else math.inf) as idle:
                    event, fds = await ch.receive(timeout=timeout)
                if idle.cancelled_caught:
                    # No batch for a while: the burst is over; what we adopted lives long.
                    # (A cancelled receive keeps in the session what it had read.)
                    gcp.resume(freeze=True)
                    event, fds = await ch.receive(timeout=timeout)
                if isinstance(event, Conns):
                    gcp.pause()
                    await self._adopt(event, fds)
                    continue
                fds.close()
                if isinstance(event, Released):
                    # (a worker's peer's base travels on the generation session instead:
                    # upgrade.Hooks.carried)
                    if not self.opts.worker:
                        self.metrics.restore(event.metrics)  # strict: ValueError aborts first
                    self._become_serving(event.upgrade_pending)
                    await fault_point("new", "after_released")
                elif isinstance(event, Done):
                    self.metrics.restore(event.metrics)
                    log.info("takeover_done", old_pid=self.old_pid, adopted=self.adopted)
                    self._give_channel()
                    return
                else:
                    raise ProtocolError(f"unexpected {type(event).__name__}")
        finally:
            gcp.resume(freeze=True)

    async def _adopt(self, event: Conns, fds: OwnedFds) -> None:
        with fds:
            await fault_point("new", "after_conns")
            local = [self.server.adopt(rec, fds.claim(rec.nfds)) for rec in event.records]
        await self.ch.send(Ack(tuple(r.id for r in event.records)))
        self.server.start(local)
        self.adopted += len(local)
        await fault_point("new", "after_ack")

    def _become_serving(self, upgrade_pending: bool) -> None:
        welcome = self.welcome
        assert welcome is not None
        if not self.opts.worker:  # (a worker's supervisor counts and records the upgrade)
            self.metrics.upgrades.labels("success").inc()
            self.metrics.upgrade_duration.labels().observe(
                max(0.0, time.time() - welcome.signalled_at))
            pidfile.record_attempt(self.cfg.proxy.pidfile, "success",
                                   started_at=welcome.started_at, old_pid=self.old_pid,
                                   new_pid=os.getpid())
        self.serving = True
        adopt_stderr()
        # Protocol 2: the old generation stopped serving the channel at RELEASED; protocol 1
        # serves it until DONE, so we take it only then.
        channel = self.channel_sock if (self.ch.session.version or 1) >= 2 else None
        if channel is not None:
            self.channel_sock = None
        self.on_serving(Serving(self.generation, upgrade_pending, channel))
        log.info("takeover_serving", old_pid=self.old_pid, adopted=self.adopted)

    def _give_channel(self) -> None:
        if self.channel_sock is not None:
            sock, self.channel_sock = self.channel_sock, None
            self.on_channel(sock)


def adopt_stderr() -> None:
    """Switch fd 2 from the pipe our parent generation reads to the real stderr it passed us,
    so our logs no longer depend on the old generation being alive. Idempotent."""
    fd = os.environ.pop(STDERR_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return
    try:
        os.dup2(int(fd), 2)
        os.close(int(fd))
    except OSError as exc:
        log.warning("stderr_switch_failed", error=str(exc))

