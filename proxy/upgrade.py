"""The hot upgrade's old side: spawn the next generation, hand it everything, roll back.

`Upgrader` lives in the serving generation. Its surface: `request_upgrade()` (SIGUSR2),
`serve_channel()` (the takeover socket's accept loop), `became_serving()` (generation.py, when
this generation starts serving), `stop()` (a graceful stop) and `phase`. One upgrade attempt:

    SIGUSR2 -> spawn `python -m proxy run --config PATH --takeover` -> the child connects ->
    HELLO/WELCOME -> LISTENERS -> READY -> stop accepting -> RELEASED (the child serves; the
    attempt succeeded) -> CONNS/ACK batches as connections become movable -> DONE -> exit

The order is takeover.py's (read its "Theory of operation"): before RELEASED only copies of the
listening sockets have moved, so every failure before it (the child exits, crashes, hangs past
`upgrade_timeout`, aborts or sends garbage) is a rollback that changes nothing: accepting
restarts, the child is killed by pid, the failure is logged with the tail of the child's stderr,
counted, and written to the status file for `proxy upgrade`. After RELEASED a connection stays
ours until its ACK; a broken session resumes the un-ACKed ones here, and if the successor died we
serve again (it is our child, or its pid is gone: never two serving generations).

Signals are never lost: one that arrives while an attempt runs is queued (several count as one)
and carried out when it ends: by us after a rollback, by the successor after a success (RELEASED
says so). One that reaches us after RELEASED is forwarded to the generation we released to.

Fd ownership: we send copies (SCM_RIGHTS duplicates them) and close our own only on the ACK
(`Server.acknowledge`) or at exit (listeners). The channel closes whatever it received.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import trio

from proxy import __version__, log, notify, pidfile
from proxy.adopt import STOPPING
from proxy.channel import Channel, ChannelError, PeerAborted, peer_allowed
from proxy.child import STDERR_TAIL_LINES, pump_stderr, spawn_child
from proxy.config import Config
from proxy.faults import fault_point
from proxy.gcpause import gc_paused
from proxy.metrics import GENERATION_FAMILIES, Metrics, delta, merged
from proxy.server import TAKEOVER_LISTENER, Server, listener_key
from proxy.takeover import (
    EXCHANGE_SINCE,
    MAX_FDS,
    PROTOCOLS,
    WORKERS_SINCE,
    Ack,
    Conns,
    Done,
    Hello,
    Listeners,
    Ready,
    Released,
    Role,
    Session,
    State,
    Welcome,
)
from proxy.takeover import Abort as TakeoverAbort

CLOSE_WAIT = 5.0  # after DONE, how long we wait for the new generation to hang up
HELLO_TIMEOUT = 5.0  # a peer that connects and says nothing must not hold the channel
BATCH_CONNS = 32  # connections per CONNS batch: each batch stalls every pair of both sides for
# its adoption, so smaller means shorter stalls; 32 vs 64 measured: the same handover time,
# p99 stall 16-18 ms instead of 24-28 (9,900 streams). The fd limit alone would allow 126.
LATE_ACK_WAIT = 0.2  # on a broken session, how long ACKs already sent may still arrive
SUCCESSOR_EXIT_WAIT = 0.5  # a session broken by the successor's death: its exit follows at once


class Phase(Enum):
    TAKING_OVER = "taking_over"
    SERVING = "serving"
    SPAWNING = "spawning"
    HANDSHAKE = "handshake"
    WAIT_READY = "wait_ready"
    RELEASED = "released"
    DONE = "done"
    DRAINING = "draining"


class UpgradeError(Exception):
    """An upgrade attempt failed; str() is the reason logged and reported."""


class SpawnFailed(UpgradeError):
    pass


class ChildExited(UpgradeError):
    pass


class NotServingInTime(UpgradeError):
    pass


class SessionFailed(UpgradeError):
    """The takeover session broke: the peer's garbage, hang-up, timeout or ABORT (cause kept)."""


class Stopping(UpgradeError):
    pass


@dataclass(eq=False)
class Attempt:
    """One upgrade attempt, from SIGUSR2 (or a peer's HELLO) to RELEASED or a rollback."""

    signalled_at: float
    started_at: float
    child: trio.Process | None = None
    decided: trio.Event = field(default_factory=trio.Event)  # released, or failed
    session_ended: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)  # released, or rolled back
    error: UpgradeError | None = None  # why it failed (before RELEASED)
    cause: str = ""  # why its session ended early (at any point)
    successor_quits: bool = False  # the peer ABORTed saying it will not serve
    successor_stopping: bool = False  # it serves, and was told to stop: so is the service
    released: bool = False
    via_workers: bool = False  # protocol 4, one process: the connections moved on .w0's session
    session_scope: trio.CancelScope | None = None

    def fail(self, error: UpgradeError) -> None:
        self.cause = self.cause or str(error)
        if self.error is None and not self.released:
            self.error = error
        self.decided.set()
        if self.session_scope is not None:
            self.session_scope.cancel()


@dataclass
class Hooks:
    """What a generation with workers adds to a session (`supervisor.py`, `worker.py`); the
    defaults are a single-process generation's."""

    worker: bool = False  # an old worker: the supervisor counts, records and decides
    gate: Callable[[Channel], Awaitable[None]] | None = None  # after READY: may we release?
    # RELEASED went out, with this base (an old worker tells its supervisor: see `carried`)
    released: Callable[[dict[str, list[Any]]], Awaitable[None]] | None = None
    # Counters our RELEASED carries besides our own: the bases of our workers' RELEASED (a
    # supervisor's, or a single process's own worker channel). A new worker does not restore
    # its peer's RELEASED; the new generation's session does, so the carried counts live in the
    # new supervisor, not only in a worker that may die or stall (supervisor.py).
    carried: Callable[[], dict[str, list[Any]]] | None = None
    rolled_back: Callable[[str], None] | None = None  # an attempt ended without RELEASED
    extra_sockets: Callable[[], dict[str, socket.socket]] | None = None  # sent with LISTENERS
    # Protocol 4 with a single process (localworker.py): after RELEASED the connections go
    # over the worker channel's session; this waits until that session ended.
    via_workers: Callable[[], Awaitable[None]] | None = None
    local_worker: bool = False  # that worker channel's Upgrader: quiet phases, traffic metrics
    # An old worker whose successor died after RELEASED: True = serve on (its supervisor says
    # the whole new generation is gone), False = finish what it holds and exit.
    successor_lost: Callable[[], Awaitable[bool]] | None = None
    serving_again: Callable[[], None] | None = None  # a supervisor serves again: so do workers
    # A supervisor's gate told its old workers RELEASE: some may have handed over already, so
    # upgrade_timeout no longer rolls the attempt back (the gate's own timeouts bound it).
    committed: Callable[[], bool] | None = None


async def _until_done_or_broken(ch: Channel, done: Callable[[], Awaitable[None]]) -> None:
    """Wait for `done()` while the peer is to say nothing: anything it says (EOF, ABORT, an
    event) means the session broke, raised as ChannelError or SessionFailed."""
    broke: list[Exception] = []
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            await trio.lowlevel.wait_readable(ch.sock)
            try:
                event, fds = await ch.receive()
                fds.close()
                raise SessionFailed(f"unexpected {type(event).__name__} while workers hand over")
            except (ChannelError, SessionFailed) as exc:
                broke.append(exc)  # raised below, as itself (not in the nursery's group)
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await done()
        nursery.cancel_scope.cancel()
    if broke:
        raise broke[0]


class Upgrader:
    """The serving generation's half of the hot upgrade. See the module docstring."""

    def __init__(self, cfg: Config, server: Server, metrics: Metrics, argv: list[str],
                 spawn: Callable[..., Any], exit_now: trio.Event,
                 hooks: Hooks | None = None) -> None:
        self.hooks = hooks or Hooks()
        self.cfg = cfg
        self.server = server
        self.metrics = metrics
        self.argv = argv
        self.spawn = spawn  # the root nursery's start_soon
        self.exit_now = exit_now
        self.generation = 1
        self.phase = Phase.TAKING_OVER
        self.serving = False  # accepting and named by the pidfile
        self.stopping = False
        self.pending = False  # a SIGUSR2 waits for the attempt in progress
        self.attempt: Attempt | None = None
        self.successor_pid = 0  # who we released to (signals that reach us go there)
        self._signal_at = 0.0  # when the first signal the next attempt answers came
        self._killed: set[int] = set()  # children we gave up on: never a session with them
        self.channel_sock: socket.socket | None = None
        self._channel_scope = trio.CancelScope()
        self._child_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    # ---- surface for generation.py -------------------------------------------------------------

    def set_phase(self, phase: Phase, **fields: Any) -> None:
        self.phase = phase
        if self.hooks.local_worker:  # the generation's phase is the other Upgrader's
            log.info("worker_channel_phase", phase=phase.value, **fields)
            return
        self.metrics.set_phase(phase.value)
        log.info("phase", phase=phase.value, **fields)

    def _snapshot(self, via_workers: bool) -> dict[str, list[Any]]:
        """What RELEASED and DONE carry: everything, or (protocol 4, one process) only the
        generation's families here and only the traffic on the worker channel's session."""
        if via_workers:
            return self.metrics.snapshot(GENERATION_FAMILIES)
        if self.hooks.local_worker:
            return self.metrics.snapshot(GENERATION_FAMILIES, exclude=True)
        return self.metrics.snapshot()

    def became_serving(self, generation: int, upgrade_pending: bool) -> None:
        self.generation = generation
        self.serving = True
        if upgrade_pending or self.pending:
            log.info("upgrade_dequeued", reason="signalled during the handover that started us")
            self.pending = False
            self.spawn(self._run_attempts)

    def request_upgrade(self) -> None:
        """SIGUSR2. Never dropped: started, queued behind the attempt in progress, or passed on
        to the generation we released to."""
        if self.stopping:
            log.warning("upgrade_refused", reason="stopping")
            pidfile.record_attempt(self.cfg.proxy.pidfile, "failed", "the proxy is stopping",
                                   started_at=time.time())
            return
        if self.successor_pid and not self.serving:
            log.info("upgrade_forwarded", to_pid=self.successor_pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.successor_pid, signal.SIGUSR2)
                return
        if not self.pending:
            self._signal_at = time.time()
        if not self.serving or self.attempt is not None:
            if not self.pending:
                log.info("upgrade_queued", reason="an upgrade is under way" if self.serving
                         else "still taking over")
            self.pending = True
            return
        self.spawn(self._run_attempts)

    async def stop(self) -> None:
        """A graceful stop: an attempt not yet released rolls back (and its child is killed);
        the channel stops taking peers."""
        self.stopping = True
        attempt = self.attempt
        if attempt is not None and not attempt.released:
            if self.hooks.committed is not None and self.hooks.committed():
                # Our workers were released: the new generation holds their connections. The
                # attempt goes through (RELEASED follows at once) and the stop is the new
                # generation's to carry out (generation.py forwards it after RELEASED).
                await attempt.finished.wait()
            else:
                attempt.fail(Stopping("stopping"))
                await attempt.finished.wait()
        self.stop_channel()

    # ---- the channel ---------------------------------------------------------------------------

    async def serve_channel(self, sock: socket.socket) -> None:
        """Accept takeover peers until cancelled; one session at a time."""
        self.channel_sock = sock
        with self._channel_scope:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    peer, _ = sock.accept()
                except BlockingIOError:
                    continue
                ok, pid, uid = peer_allowed(peer)
                attempt = self.attempt
                if not ok:
                    log.warning("takeover_peer_refused", peer_pid=pid, peer_uid=uid,
                                reason="uid differs")
                elif pid in self._killed:
                    log.warning("takeover_peer_refused", peer_pid=pid, reason="given up on")
                elif self.stopping or not self.serving:
                    log.warning("takeover_peer_refused", peer_pid=pid, reason="not serving")
                elif attempt is not None and (attempt.session_scope is not None or (
                        attempt.child is not None and attempt.child.pid != pid)):
                    log.warning("takeover_peer_refused", peer_pid=pid, reason="busy")
                else:
                    own = attempt is not None
                    if attempt is None:  # a --takeover process started by hand
                        now = time.time()
                        attempt = self.attempt = Attempt(now, now)
                    attempt.session_scope = trio.CancelScope()
                    self.spawn(self._session, peer, pid, attempt, own)
                    continue
                peer.close()

    def stop_channel(self) -> None:
        self._channel_scope.cancel()

    def _restart_channel(self) -> None:
        if self.channel_sock is not None and self.channel_sock.fileno() >= 0:
            self._channel_scope = trio.CancelScope()
            self.spawn(self.serve_channel, self.channel_sock)

    # ---- attempts ------------------------------------------------------------------------------

    async def _run_attempts(self) -> None:
        """Attempts until one succeeds or no signal is queued: a signal that came during a
        rollback is carried out right after it."""
        while self.serving and not self.stopping and self.attempt is None:
            self.pending = False
            if await self._attempt():
                return
            if not self.pending:
                return

    async def _attempt(self) -> bool:
        now = time.time()
        attempt = self.attempt = Attempt(self._signal_at or now, now)
        self._signal_at = 0.0
        self._child_tail.clear()
        self.set_phase(Phase.SPAWNING)
        try:
            attempt.child = await spawn_child(self.argv)
        except OSError as exc:
            attempt.fail(SpawnFailed(f"cannot start the next generation: {exc}"))
        if attempt.child is not None:
            proc = attempt.child
            log.info("upgrade_spawned", child_pid=proc.pid)
            self.spawn(pump_stderr, proc, self._child_tail)

            async def watch_child() -> None:
                await proc.wait()
                attempt.fail(ChildExited(f"exited with status {proc.returncode}"))

            async def until_decided() -> None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_child)
                    await attempt.decided.wait()
                    nursery.cancel_scope.cancel()

            with trio.move_on_after(self.cfg.proxy.upgrade_timeout):
                await until_decided()
            if (not attempt.decided.is_set() and self.hooks.committed is not None
                    and self.hooks.committed()):
                log.warning("upgrade_committed_late", reason="old workers were released: "
                            "upgrade_timeout no longer rolls back")
                await until_decided()
            if not attempt.decided.is_set():
                attempt.fail(NotServingInTime(
                    f"not serving within upgrade_timeout={self.cfg.proxy.upgrade_timeout}s"))
        if attempt.session_scope is not None and not attempt.released:
            await attempt.session_ended.wait()
        child = attempt.child
        if child is not None and isinstance(attempt.error, SessionFailed | NotServingInTime):
            # A broken channel usually means the child died: say how, it is the useful part.
            with trio.move_on_after(SUCCESSOR_EXIT_WAIT):
                await child.wait()
            if child.returncode is not None:
                attempt.error = ChildExited(
                    f"exited with status {child.returncode} ({attempt.error})")
        return self._settle(attempt)

    def _settle(self, attempt: Attempt) -> bool:
        """Account for a finished attempt: success, or a rollback with its reason."""
        if self.attempt is attempt:
            self.attempt = None
        attempt.finished.set()
        if attempt.released:
            return True
        proc = attempt.child
        if proc is not None and proc.returncode is None:
            self._killed.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            log.info("upgrade_child_killed", child_pid=proc.pid)
        reason = str(attempt.error or "the takeover session ended early")
        if self.hooks.rolled_back is not None:
            self.hooks.rolled_back(reason)
        if self.hooks.worker:
            log.warning("worker_handover_aborted", reason=reason)
        else:
            self.metrics.upgrades.labels("failed").inc()
            tail = " | ".join(list(self._child_tail)[-5:])
            log.error("upgrade_failed", reason=reason, child_stderr_tail=tail)
            pidfile.record_attempt(self.cfg.proxy.pidfile, "failed", reason,
                                   started_at=attempt.started_at)
        if not self.stopping:
            self.serving = True
            self.spawn(self.server.accept_all)  # a no-op if we never stopped
            self.set_phase(Phase.SERVING)
        return False

    # ---- one session ---------------------------------------------------------------------------

    async def _session(self, sock: socket.socket, peer_pid: int, attempt: Attempt,
                       own: bool) -> None:
        """One takeover session. `own`: the peer is the child of `attempt` (which settles the
        attempt); otherwise a --takeover process started by hand, settled here."""
        ch = Channel(sock, Session(Role.OLD), self.cfg.proxy.upgrade_timeout)
        assert attempt.session_scope is not None
        try:
            with attempt.session_scope:
                try:
                    await self._hand_over(ch, attempt, peer_pid)
                    return
                except Exception as exc:
                    # Whatever goes wrong in a session (a peer's garbage, or a bug of ours)
                    # ends that session; it never takes the serving generation down with it.
                    if not isinstance(exc, ChannelError | UpgradeError):
                        log.error("takeover_session_error", error=repr(exc)[:300])
                    if isinstance(exc, PeerAborted) and not exc.serving:
                        attempt.successor_quits = True
                    elif isinstance(exc, PeerAborted) and exc.reason == STOPPING:
                        attempt.successor_stopping = True
                    attempt.fail(exc if isinstance(exc, UpgradeError)
                                 else SessionFailed(str(exc)))
            # Failed, or cancelled (upgrade timeout, the child exited, a graceful stop).
            with trio.CancelScope(shield=True):
                await self._after_broken_session(ch, attempt, peer_pid, own)
        finally:
            ch.close()
            attempt.session_scope = None
            attempt.session_ended.set()

    async def _after_broken_session(self, ch: Channel, attempt: Attempt, peer_pid: int,
                                    own: bool) -> None:
        if not attempt.released:
            # Nothing but listener copies moved: a rollback changes nothing for clients. (A
            # peer that never said a valid HELLO is just dropped: we owe it no answer.)
            if ch.session.state is not State.IDLE:
                await ch.abort(str(attempt.error or "aborted"), serving=True)
            if own:
                return  # _attempt settles it (kills the child, logs, counts)
            if ch.session.state is State.IDLE:
                # A peer that never said a valid HELLO is no upgrade attempt: drop it.
                log.warning("takeover_peer_dropped", peer_pid=peer_pid, reason=attempt.cause)
                self.attempt = None
                attempt.finished.set()
            else:
                self._settle(attempt)
            if self.pending and self.serving:  # a signal came while that peer held the channel
                self.spawn(self._run_attempts)
            return
        # Released: the successor serves. An ABORT it sent while we were not reading (waiting
        # for our workers) says why it went; ACKs already on their way still count.
        with contextlib.suppress(ChannelError):
            got = None if ch.session.unacked else ch.ready_now()
            if got is not None and isinstance(got[0], TakeoverAbort):
                got[1].close()
                attempt.successor_stopping = got[0].reason == STOPPING
        with trio.move_on_after(LATE_ACK_WAIT), contextlib.suppress(ChannelError):
            while ch.session.unacked:
                event, fds = await ch.receive()
                fds.close()
                if isinstance(event, Ack):
                    self.server.acknowledge(event.ids)
        await ch.abort(attempt.cause or "aborted", serving=False)
        # Fence: from here a slow successor's ACK write fails (EPIPE), so it cannot take a
        # batch we are about to resume; an ACK already queued still counts.
        with contextlib.suppress(OSError):
            ch.sock.shutdown(socket.SHUT_RD)
        with contextlib.suppress(ChannelError):
            while ch.session.unacked:
                got = ch.ready_now()
                if got is None:
                    break
                event, fds = got
                fds.close()
                if isinstance(event, Ack):
                    self.server.acknowledge(event.ids)
        if not attempt.via_workers:  # (else the worker channel's Upgrader resumes its own)
            self.server.hold.release()
            kept = self.server.resume_exported()
            if kept:
                log.info("handover_resumed", connections=kept)
        quits = attempt.successor_quits  # it gave up before it saw RELEASED: it exits
        # (an old worker's supervisor decides by its successor generation's pid, not by this
        # peer's: a new worker that quits may still be finishing what it took)
        gone = await pidfile.wait_gone(
            peer_pid, self.cfg.proxy.upgrade_timeout if quits and not self.hooks.worker
            else SUCCESSOR_EXIT_WAIT)
        if quits and not gone and attempt.child is not None:
            self._killed.add(peer_pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer_pid, signal.SIGKILL)
        if attempt.successor_stopping:
            # SIGTERM reached the generation we released to: the service is stopping, and we
            # must not take it back. We finish what we hold, like it does, and exit.
            log.info("successor_stopping", successor_pid=peer_pid, kept=len(self.server.conns))
            self.spawn(self._drain_then_exit)
            return
        if (gone or quits) and self.hooks.worker:
            if self.hooks.successor_lost is not None and await self.hooks.successor_lost():
                log.error("successor_lost", successor_pid=peer_pid, kept=len(self.server.conns))
                self.successor_pid = 0
                self.serving = True
                self.spawn(self.server.accept_all)
                self._restart_channel()
                self.set_phase(Phase.SERVING)
                return
        elif gone or quits:
            # The generation we released to is gone: nobody serves; we do again. The upgrade
            # did not stick: count and record it as failed.
            reason = f"the new generation (pid {peer_pid}) died after it took over: {attempt.cause}"
            log.error("successor_lost", successor_pid=peer_pid, kept=len(self.server.conns))
            self.metrics.upgrades.labels("failed").inc()
            log.error("upgrade_failed", reason=reason)
            pidfile.record_attempt(self.cfg.proxy.pidfile, "failed", reason,
                                   started_at=attempt.started_at, new_pid=peer_pid)
            self.successor_pid = 0
            self.serving = True
            self.spawn(self.server.accept_all)
            if self.hooks.serving_again is not None:
                self.hooks.serving_again()
            pidfile.write(self.cfg.proxy.pidfile)
            self._restart_channel()
            notify.title(f"generation {self.generation} serving")
            self.set_phase(Phase.SERVING)
            if self.pending:  # a signal that found no successor to go to
                self.spawn(self._run_attempts)
            return
        log.error("handover_incomplete", reason=attempt.cause, kept=len(self.server.conns))
        notify.title(f"generation {self.generation} draining")
        self.set_phase(Phase.DRAINING, connections=len(self.server.conns))
        self.spawn(self._drain_then_exit)

    async def _drain_then_exit(self) -> None:
        await self.server.drain(self.cfg.proxy.drain_timeout)
        self.exit_now.set()

    async def _hand_over(self, ch: Channel, attempt: Attempt, peer_pid: int) -> bool:
        srv = self.server
        self.set_phase(Phase.HANDSHAKE, peer_pid=peer_pid)
        hello, _ = await ch.receive(timeout=min(HELLO_TIMEOUT, ch.timeout))
        assert isinstance(hello, Hello)
        version = ch.session.version
        if version is None:
            raise SessionFailed(f"no common protocol version: we speak {PROTOCOLS[0]}.."
                                f"{PROTOCOLS[1]}, the peer {hello.protocols[0]}.."
                                f"{hello.protocols[1]}")
        await ch.send(Welcome(os.getpid(), self.generation, attempt.signalled_at,
                              attempt.started_at, __version__, version))
        socks = srv.listener_sockets()
        if self.channel_sock is not None:
            socks[listener_key(TAKEOVER_LISTENER, str(self.cfg.proxy.takeover_socket))] = (
                self.channel_sock)
        if self.hooks.extra_sockets is not None:
            socks.update(self.hooks.extra_sockets())
        keys = list(socks)
        await ch.send(Listeners(tuple(keys)), [socks[k].fileno() for k in keys])
        self.set_phase(Phase.WAIT_READY)
        event, _ = await ch.receive()
        if not isinstance(event, Ready):
            raise SessionFailed(f"expected READY, got {type(event).__name__}")
        await fault_point("old", "after_ready")
        if self.hooks.gate is not None:
            await self.hooks.gate(ch)  # raises UpgradeError: this attempt rolls back
            await fault_point("old", "after_gate")
        # The new generation holds every listener; one of us accepts at a time. Connections
        # that arrive between these two lines wait in the backlog we share.
        srv.stop_accepting()
        self.serving = False
        carry = self.pending and version >= 2  # protocol 1 cannot say it: we forward instead
        via_workers = self.hooks.via_workers is not None and version >= WORKERS_SINCE
        # One snapshot is both what RELEASED carries and the base of DONE's delta, so every
        # count lands in exactly one of them (a second one taken after the send would drop what
        # was counted while the send yielded).
        base = self._snapshot(via_workers)
        sent = base
        if self.hooks.carried is not None:
            try:
                sent = merged(base, self.hooks.carried())
            except ValueError as exc:  # (a worker's base that does not restore: ours alone)
                log.error("carried_metrics_bad", error=str(exc))
        await ch.send(Released(sent, upgrade_pending=carry))
        if carry:  # (only once it went out: a failed send rolls back with it still queued)
            self.pending = False
        notify.title(f"generation {self.generation} handing over")
        attempt.released = True
        attempt.decided.set()
        self.successor_pid = peer_pid  # (the kernel's word, SO_PEERCRED, not the peer's)
        self.stop_channel()  # the successor serves the channel from now on
        if self.hooks.released is not None:
            await self.hooks.released(base)
        self.set_phase(Phase.RELEASED, successor_pid=peer_pid, connections=len(srv.conns))
        self.attempt = None
        attempt.finished.set()
        if self.pending:  # came while RELEASED was on its way: the successor's to carry out
            self.pending = False
            self.request_upgrade()
        await fault_point("old", "after_released")
        moved = 0
        if via_workers and self.hooks.via_workers is not None:
            attempt.via_workers = True
            await _until_done_or_broken(ch, self.hooks.via_workers)
        else:
            srv.hold.hold()  # idle http clients stop taking requests: they move next
            t0 = trio.current_time()
            with gc_paused():  # only while batches flow, not while we wait for a slow request
                moved = await self._send_movable(ch)
            log.info("handed_over", moved=moved,
                     handover_ms=round((trio.current_time() - t0) * 1000, 1))
        # What could not move yet (a connect in progress, a request half-served) finishes
        # here and moves as soon as it can, up to drain_timeout.
        with trio.move_on_after(self.cfg.proxy.drain_timeout) as drain:
            if via_workers or not srv.accept_traffic:
                # Nothing travels on this session (the workers' sessions carry it all): watch
                # it, so a successor that ABORTs meanwhile (a SIGTERM) is heard at once.
                await _until_done_or_broken(ch, self._until_empty)
            while not srv.holds_nothing():
                with gc_paused():
                    moved += await self._send_movable(ch)
                if not srv.holds_nothing():
                    await srv.wait_changed()
        if drain.cancelled_caught:
            log.warning("drain_timeout", left=len(srv.conns), busy=srv.busy)
            srv.stop_handlers()
        await fault_point("old", "before_done")
        await ch.send(Done(delta(self._snapshot(via_workers), base)))
        self.set_phase(Phase.DONE, moved=moved)
        # Wait for the new generation to hang up, so its last lines through our pipe are out.
        with trio.move_on_after(CLOSE_WAIT), contextlib.suppress(ChannelError):
            await ch.receive()
        self.exit_now.set()
        return True

    async def _until_empty(self) -> None:
        while not self.server.holds_nothing():
            await self.server.wait_changed()

    async def _send_movable(self, ch: Channel) -> int:
        """Pause, send and (on ACK) release every movable connection, a batch at a time, with
        up to the session's window of batches in flight: we pause and send the next while the
        new generation adopts the last. ACKs come back in batch order."""
        total = 0
        while True:
            ids = (self.server.pick_movable(BATCH_CONNS, MAX_FDS,
                                            (ch.session.version or 1) >= EXCHANGE_SINCE)
                   if ch.session.can_send_conns() else [])
            if ids:
                records, conn_fds = await self.server.export(ids)
                if records:
                    await ch.send(Conns(tuple(records)), conn_fds)
                    await fault_point("old", "after_conns")
                continue
            if not ch.session.unacked:
                return total
            # A successor that is slow to ACK (busy, or SIGSTOPped for a while) is waited for:
            # it serves already, and an un-ACKed pair is only paused, never lost.
            event, got = await ch.receive(timeout=self.cfg.proxy.drain_timeout)
            got.close()
            if not isinstance(event, Ack):
                raise SessionFailed(f"expected ACK, got {type(event).__name__}")
            total += self.server.acknowledge(event.ids)
