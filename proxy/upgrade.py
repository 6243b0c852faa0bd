"""The upgrader: spawn the next generation, hand it everything over the takeover channel, roll back.

Old side (`Upgrader`, in the serving generation): on SIGUSR2 `upgrade()` spawns
`sys.executable -m proxy run --config PATH --takeover`; the takeover channel's accept loop
(`serve_channel`) takes the peer (same uid or root, one at a time) and `_session` runs the
sequence documented in `takeover.py`, phase by phase (`Phase`, logged and exported):

    HELLO/WELCOME -> LISTENERS (fds) -> READY -> CONNS/ACK batches -> stop accepting
    -> last CONNS/ACK batches -> RELEASED (metrics; the new generation starts accepting)
    -> hand over the rest as it becomes movable -> DONE -> exit

A connection stays ours until the new generation ACKs it: we pause it, send it, and only close
our copies of its fds on the ACK. Any failure before RELEASED (the child exits, crashes, hangs
past `upgrade_timeout`, sends garbage, or the channel breaks) rolls back: every sent-but-unACKed
pair is resumed here from its snapshot, accepting restarts, the child is killed by pid, and the
failure is logged (with the tail of the child's stderr) and counted. The new generation ACKs a
batch *before* it starts those relays, so an un-ACKed pair was never touched by it.

New side (`take_over`, in a process started with --takeover): connects, takes the listeners
(binding those it did not inherit, closing inherited ones its config dropped), says READY, adopts
each CONNS batch (ACK, then resume), becomes the serving generation on RELEASED (accepting,
pidfile,
sd_notify, metrics restored, its logs switched from the old generation's pipe to the real
stderr), and on DONE takes the channel's listening socket.
If the old generation dies after READY, the new one keeps what it received and serves fully.

Fd ownership: fds received are owned by `take_over` until placed in a Server/Relay; leftovers and
those of a dropped peer are closed. The old side sends copies (SCM_RIGHTS duplicates them) and
closes its own only after the ACK (pairs) or at exit (listeners).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from proxy import __version__, fdpass, log, pidfile
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.server import TAKEOVER_LISTENER, Conn, Server, listener_key
from proxy.takeover import (
    MAX_FDS,
    Codec,
    ConnRecord,
    Message,
    MsgType,
    ProtocolError,
    conns_message,
    field_of,
    parse_conns,
)

# GC_NOTE: a generation holding N pairs tracks ~80 objects per pair; a full collection over
# them stops the process for up to hundreds of ms at 10k pairs, and a handover (old: pausing
# them all; new: allocating them all) triggers several. So the collector is off while a
# handover runs on either side, and the new generation then freezes what it adopted (long-lived
# relays need not be scanned again). Garbage made meanwhile is collected once it is back on.
FAULT_ENV = "PROXY_TEST_FAULT_FILE"  # test-only: see `fault()`
STDERR_FD_ENV = "PROXY_STDERR_FD"  # set by the upgrader for its child: the real stderr's fd
STDERR_TAIL_LINES = 20
CLOSE_WAIT = 5.0
ACK_WINDOW = 4  # CONNS batches sent ahead of their ACK
BATCH_CONNS = 64  # connections per CONNS batch (the fd limit alone would allow 126)
HELLO_TIMEOUT = 5.0  # after DONE, how long the old generation waits for the new one to hang up


class Phase(Enum):
    TAKING_OVER = "taking_over"
    SERVING = "serving"
    SPAWNING = "spawning"
    HANDSHAKE = "handshake"
    WAIT_READY = "wait_ready"
    HANDOVER = "handover"
    RELEASED = "released"
    DONE = "done"
    DRAINING = "draining"


class UpgradeFailed(Exception):
    """A handover attempt failed; the message is the reason logged and reported."""


# ---- test-only fault hooks ---------------------------------------------------------------------
# Tests write "<side>:<step>:<action>" into the file named by $PROXY_TEST_FAULT_FILE, e.g.
# "new:before_ready:crash". side: new | old; action: crash (exit 3 at once) | hang (stop
# responding) | exit (exit 1). Read when the step is reached, so a test arms one upgrade at a time.
# Never set in production; the README lists it under "test-only".

def fault(side: str, step: str) -> str | None:
    path = os.environ.get(FAULT_ENV)
    if not path:
        return None
    try:
        spec = Path(path).read_text().strip()
    except OSError:
        return None
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == side and parts[1] == step:
        log.warning("test_fault", side=side, step=step, action=parts[2])
        if parts[2] == "crash":
            os._exit(3)
        if parts[2] == "exit":
            os._exit(1)
        return parts[2]
    return None


async def fault_point(side: str, step: str) -> None:
    if fault(side, step) == "hang":
        await trio.sleep_forever()


# ---- the channel adapter -----------------------------------------------------------------------

class Channel:
    """A connected takeover channel: the codec plus a socket. Closes leftover fds on close()."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self.codec = Codec()

    async def send(self, msg: Message) -> None:
        with trio.fail_after(self.timeout):
            await fdpass.send(self.sock, Codec.send(msg), msg.fds)

    async def recv(self, *expect: MsgType, timeout: float | None = None) -> Message:
        """The next message, which must be one of `expect`. ABORT from the peer raises."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                msg = self.codec.next_message()
                if msg is not None:
                    break
                await fdpass.recv(self.sock, self.codec)
        if msg.type not in expect:
            for fd in msg.fds:
                os.close(fd)
            if msg.type is MsgType.ABORT:
                raise UpgradeFailed(f"peer aborted: {msg.head.get('reason')!r:.200}")
            raise ProtocolError(f"unexpected {msg.type.name}, wanted {[e.name for e in expect]}")
        return msg

    def close(self) -> None:
        for fd in self.codec.leftover_fds():
            os.close(fd)
        self.sock.close()


CHANNEL_ERRORS = (ProtocolError, EOFError, OSError, trio.TooSlowError, UpgradeFailed, ValueError)


def bind_channel(path: Path) -> socket.socket:
    """Listen on the takeover socket (mode 0600). A stale socket file is replaced; a live one
    means a generation already serves there: OSError."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        raise OSError(f"a generation already serves on {path} (use --takeover to replace it)")
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def peer_allowed(sock: socket.socket) -> tuple[bool, int, int]:
    pid, uid, _ = fdpass.peer_cred(sock)
    me = os.getuid()
    return uid == me or uid == 0, pid, uid


# ---- old side ----------------------------------------------------------------------------------

class Upgrader:
    """The serving generation's half: SIGUSR2, the channel's accept loop, handover sessions."""

    def __init__(self, cfg: Config, server: Server, metrics: Metrics, generation: int,
                 argv: list[str], spawn: Callable[..., Any], exit_now: trio.Event) -> None:
        self.cfg = cfg
        self.server = server
        self.metrics = metrics
        self.generation = generation
        self.argv = argv
        self.spawn = spawn  # root nursery's start_soon: restarts accepting after a rollback
        self.exit_now = exit_now
        self.phase = Phase.SERVING
        self.channel_sock: socket.socket | None = None
        self.channel_scope = trio.CancelScope()
        self.child: trio.Process | None = None
        self.child_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.in_progress = False
        self.stopping = False
        self.signalled_at = 0.0
        self.session_scope: trio.CancelScope | None = None
        self.session_done = trio.Event()
        self.failure = ""
        self._session_change = trio.lowlevel.ParkingLot()

    def set_phase(self, phase: Phase, **fields: Any) -> None:
        self.phase = phase
        self.metrics.set_phase(phase.value)
        log.info("phase", phase=phase.value, **fields)

    async def serve_channel(self, sock: socket.socket) -> None:
        """Accept takeover peers until cancelled; one session at a time."""
        self.channel_sock = sock
        with self.channel_scope:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    peer, _ = sock.accept()
                except BlockingIOError:
                    continue
                ok, pid, uid = peer_allowed(peer)
                if not ok:
                    log.warning("takeover_peer_refused", peer_pid=pid, peer_uid=uid,
                                reason="uid differs")
                    peer.close()
                    continue
                if self.session_scope is not None or self.stopping:
                    log.warning("takeover_peer_refused", peer_pid=pid, reason="busy")
                    peer.close()
                    continue
                self.session_scope = trio.CancelScope()
                self.session_done = trio.Event()
                self.spawn(self._session, peer, pid, self.session_scope)

    async def upgrade(self) -> None:
        """SIGUSR2: start the next generation and see the handover through (or roll back)."""
        if self.in_progress or self.session_scope is not None:
            log.warning("upgrade_ignored", reason="an upgrade is already under way")
            return
        if self.stopping:
            log.warning("upgrade_ignored", reason="stopping")
            return
        self.in_progress = True
        self.signalled_at = time.time()
        self.failure = ""
        self.child_tail.clear()
        self.set_phase(Phase.SPAWNING)
        try:
            await self._upgrade()
        finally:
            self.in_progress = False

    async def _upgrade(self) -> None:
        # The child logs into a pipe we read (so a failure report can quote its stderr) and
        # switches to our real stderr, passed as an extra fd, once it serves (`adopt_stderr`).
        real_stderr = os.dup(2)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy", *self.argv], stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(real_stderr,),
                env={**os.environ, STDERR_FD_ENV: str(real_stderr)})
        except OSError as exc:
            self._failed(f"cannot start the next generation: {exc}")
            return
        finally:
            os.close(real_stderr)
        self.child = proc
        log.info("upgrade_spawned", child_pid=proc.pid)
        self.spawn(self._pump_stderr, proc)
        outcome = "timeout"
        with trio.move_on_after(self.cfg.proxy.upgrade_timeout):
            async with trio.open_nursery() as nursery:
                async def exited() -> None:
                    nonlocal outcome
                    await proc.wait()
                    outcome = f"exited with status {proc.returncode}"
                    nursery.cancel_scope.cancel()

                async def released() -> None:
                    nonlocal outcome
                    while not self.failure and self.phase not in (Phase.RELEASED, Phase.DONE):
                        await self.wait_session_change()
                    outcome = self.failure or "ok"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                nursery.start_soon(released)
        if outcome == "ok":
            return
        if outcome == "timeout":
            outcome = f"not serving within upgrade_timeout={self.cfg.proxy.upgrade_timeout}s"
        if self.session_scope is not None and not self.failure:
            self.failure = outcome
            self.session_scope.cancel()
            await self.session_done.wait()
        elif not self.failure:
            self._failed(outcome)
        self._kill_child()

    async def wait_session_change(self) -> None:
        await self._session_change.park()

    def _notify(self) -> None:
        self._session_change.unpark_all()

    async def _pump_stderr(self, proc: trio.Process) -> None:
        """Copy the child's stderr to ours line by line, keeping a tail for failure reports."""
        assert proc.stderr is not None
        buf = b""
        out = sys.stderr.buffer
        async with proc.stderr:
            while True:
                try:
                    chunk = await proc.stderr.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self.child_tail.append(line.decode("utf-8", "replace"))
                    out.write(line + b"\n")
                out.flush()

    def _kill_child(self) -> None:
        proc = self.child
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            log.info("upgrade_child_killed", child_pid=proc.pid)

    def _failed(self, reason: str) -> None:
        self.failure = reason
        self.metrics.upgrades.labels("failed").inc()
        tail = " | ".join(list(self.child_tail)[-5:])
        log.error("upgrade_failed", reason=reason, child_stderr_tail=tail)
        pidfile.write_status(self.cfg.proxy.pidfile, "failed", reason)
        self.set_phase(Phase.SERVING)
        self._notify()

    async def _session(self, sock: socket.socket, peer_pid: int, scope: trio.CancelScope) -> None:
        ch = Channel(sock, self.cfg.proxy.upgrade_timeout)
        sent: dict[int, Conn] = {}  # paused and sent, not yet acknowledged: still ours
        released = False
        ours = self.child is not None and self.child.pid == peer_pid
        try:
            with scope:
                try:
                    await self._hand_over(ch, sent, peer_pid, ours)
                    return
                except Exception as exc:
                    # Whatever goes wrong in a session (a peer's garbage, or a bug of ours)
                    # ends that session and rolls back; it never takes the serving
                    # generation down with it.
                    if not isinstance(exc, CHANNEL_ERRORS):
                        log.error("takeover_session_error", error=repr(exc)[:300])
                    if not self.failure:
                        self.failure = f"{type(exc).__name__}: {exc}"
                finally:
                    released = self.phase in (Phase.RELEASED, Phase.DONE)
            # Cancelled (upgrade timeout / child exit) or failed: roll back what is still ours.
            with trio.CancelScope(shield=True):
                await self._rollback(ch, sent, released, peer_pid, ours)
        finally:
            gc.enable()
            ch.close()
            self.session_scope = None
            self.session_done.set()
            self._notify()

    async def _hand_over(self, ch: Channel, sent: dict[int, Conn], peer_pid: int,
                         ours: bool) -> None:
        srv = self.server
        self.set_phase(Phase.HANDSHAKE, peer_pid=peer_pid)
        # A peer gets a short while to introduce itself: one that connects and says nothing
        # must not hold the channel (one session at a time) for a whole upgrade_timeout.
        hello = await ch.recv(MsgType.HELLO, timeout=min(HELLO_TIMEOUT, ch.timeout))
        field_of(hello, "pid", int)
        await ch.send(Message(MsgType.WELCOME, {"pid": os.getpid(), "generation": self.generation,
                                                "signalled_at": self.signalled_at or time.time(),
                                                "version": __version__}))
        socks = srv.listener_sockets()
        if self.channel_sock is not None:
            socks[listener_key(TAKEOVER_LISTENER, str(self.cfg.proxy.takeover_socket))] = (
                self.channel_sock)
        keys = list(socks)
        await ch.send(Message(MsgType.LISTENERS, {"listeners": keys},
                              fds=[socks[k].fileno() for k in keys]))
        self.set_phase(Phase.WAIT_READY)
        await ch.recv(MsgType.READY)
        self.set_phase(Phase.HANDOVER, connections=len(srv.conns))
        srv.hold.hold()  # idle http clients stop taking requests: they move next
        gc.disable()  # see GC_NOTE
        await fault_point("old", "after_ready")
        t0 = trio.current_time()
        # The bulk of the pairs moves while we still accept; then we stop, sweep up what came
        # in meanwhile and release. The new generation accepts only after RELEASED: had it
        # accepted from READY on, a client it took and then died with would be lost. Until
        # then new connects wait in the listen backlog both of us share, and a rollback
        # finds them there.
        moved = await self._send_movable(ch, sent)
        srv.stop_accepting()
        moved += await self._send_movable(ch, sent)
        await ch.send(Message(MsgType.RELEASED, {"metrics": self.metrics.snapshot()}))
        base = self.metrics.snapshot()
        self.set_phase(Phase.RELEASED, moved=moved,
                       handover_ms=round((trio.current_time() - t0) * 1000, 1))
        self._notify()
        await fault_point("old", "after_released")
        # What could not move yet (a connect in progress, a request half-served) finishes here
        # and moves as soon as it can, up to drain_timeout.
        with trio.move_on_after(self.cfg.proxy.drain_timeout) as drain:
            while not srv.holds_nothing():
                moved += await self._send_movable(ch, sent)
                if not srv.holds_nothing():
                    await srv.wait_changed()
        if drain.cancelled_caught:
            log.warning("drain_timeout", left=len(srv.conns), busy=srv.busy)
            srv.stop_handlers()
        delta = _delta(self.metrics.snapshot(), base)
        await ch.send(Message(MsgType.DONE, {"metrics": delta}))
        self.set_phase(Phase.DONE, moved=moved)
        # Wait for the new generation to hang up, so its last lines through our pipe are out.
        with trio.move_on_after(CLOSE_WAIT), contextlib.suppress(*CHANNEL_ERRORS):
            await ch.recv(MsgType.ABORT)
        self.exit_now.set()

    async def _send_movable(self, ch: Channel, sent: dict[int, Conn]) -> int:
        """Pause, send and (on ACK) release every movable pair, a batch at a time, with up to
        ACK_WINDOW batches in flight: we pause and send the next while the new generation
        adopts the last. ACKs come back in batch order."""
        total = 0
        in_flight: collections.deque[list[int]] = collections.deque()
        while True:
            batch = _batch(self.server.movable()) if len(in_flight) < ACK_WINDOW else []
            if batch:
                for c in batch:
                    assert c.handler is not None
                    c.handler.request_pause()
                records: list[ConnRecord] = []
                fds: list[int] = []
                for c in batch:
                    assert c.handler is not None
                    snap = await c.handler.pause()
                    if snap is None:  # finished on its own meanwhile
                        continue
                    server = str(c.server.addr) if c.server is not None else ""
                    records.append(ConnRecord(c.id, c.listener, c.mode, c.client, server, snap))
                    fds.extend(c.handler.fds())
                    sent[c.id] = c
                if records:
                    await ch.send(conns_message(records, fds))
                    in_flight.append([r.id for r in records])
                    await fault_point("old", "after_conns")
                continue
            if not in_flight:
                return total
            ids = ack_ids(await ch.recv(MsgType.ACK))
            if sorted(ids) != sorted(in_flight.popleft()):
                raise ProtocolError("ACK does not match the batch sent")
            for cid in ids:
                c = sent.pop(cid)
                assert c.handler is not None
                c.handler.close()
                self.server.forget(c)
                self.metrics.handover_connections.labels(c.mode).inc()
            total += len(ids)

    async def _rollback(self, ch: Channel, sent: dict[int, Conn], released: bool, peer_pid: int,
                        ours: bool) -> None:
        reason = self.failure or "channel closed"
        proc = self.child
        if ours and proc is not None and "exited with status" not in reason:
            # A broken channel usually means the child died: say how, it is the useful part.
            with trio.move_on_after(0.5):
                await proc.wait()
            if proc.returncode is not None:
                reason = self.failure = f"exited with status {proc.returncode} ({reason})"
        if self.phase is Phase.HANDSHAKE and not ours:
            # A peer that never said a valid HELLO is no upgrade attempt: drop it, count nothing.
            log.warning("takeover_peer_dropped", peer_pid=peer_pid, reason=reason)
            self.failure = ""
            self.set_phase(Phase.SERVING)
            return
        if ours:
            self._kill_child()
        # ACKs already in the socket buffer still count: those pairs belong to the new side.
        with trio.move_on_after(0.2), contextlib.suppress(*CHANNEL_ERRORS):
            while sent:
                for cid in ack_ids(await ch.recv(MsgType.ACK)):
                    c = sent.pop(cid, None)
                    if c is not None and c.handler is not None:
                        c.handler.close()
                        self.server.forget(c)
        self.server.hold.release()
        for c in sent.values():
            self.server.resume(c)
        if sent:
            log.info("handover_resumed", connections=len(sent))
        peer_alive = pidfile.alive(peer_pid) and not ours
        if released and peer_alive:
            # The new generation serves; keep what we still hold until it is done, then exit.
            log.error("handover_incomplete", reason=reason, kept=len(sent))
            self.spawn(self._drain_then_exit)
            return
        if not self.stopping:
            self.spawn(self.server.accept_all)  # a no-op if we never stopped
        if released:
            pidfile.write(self.cfg.proxy.pidfile)
        self._failed(reason)

    async def _drain_then_exit(self) -> None:
        await self.server.drain(self.cfg.proxy.drain_timeout)
        self.exit_now.set()


def ack_ids(msg: Message) -> list[int]:
    ids = field_of(msg, "ids", list)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ProtocolError("ACK.ids: not a list of integers")
    return [int(i) for i in ids]


def _batch(conns: list[Conn]) -> list[Conn]:
    """As many conns as fit one CONNS frame's fds, and at most BATCH_CONNS: each batch is
    paused and adopted in one go, during which every other connection of that process waits,
    so smaller batches mean shorter stalls for everyone (with ACK_WINDOW keeping the pipe full)."""
    out: list[Conn] = []
    nfds = 0
    for c in conns:
        assert c.handler is not None
        k = len(c.handler.fds())
        if nfds + k > MAX_FDS or len(out) >= BATCH_CONNS:
            break
        out.append(c)
        nfds += k
    return out



def _delta(now: dict[str, list[Any]], base: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """What was counted since `base` (a snapshot of the same registry)."""
    out: dict[str, list[Any]] = {}
    for name, rows in now.items():
        before = {tuple(lv): v for lv, v in base.get(name, [])}
        diff = []
        for lv, v in rows:
            b = before.get(tuple(lv))
            if isinstance(v, list):
                bc, bs = b if b is not None else ([0.0] * len(v[0]), 0.0)
                diff.append([lv, [[x - y for x, y in zip(v[0], bc, strict=True)], v[1] - bs]])
            else:
                diff.append([lv, v - (b or 0.0)])
        out[name] = diff
    return out


# ---- new side ----------------------------------------------------------------------------------

class TakeoverRefused(Exception):
    """The new generation could not take over (nothing serves on the channel, a bad peer...)."""


async def take_over(cfg: Config, server: Server, metrics: Metrics,
                    on_serving: Callable[[int], None], on_channel: Callable[[socket.socket], None],
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Receive listeners and connections from the generation serving on the channel.

    `task_status.started(generation)` once listeners are open; `on_serving(generation)` when
    this generation becomes the serving one (and may start accepting); `on_channel(sock)`
    with the channel's listening socket once the old generation is gone.
    """
    await fault_point("new", "start")
    gc.disable()  # see GC_NOTE; re-enabled (after a freeze) when the handover ends
    try:
        await _take_over(cfg, server, metrics, on_serving, on_channel, task_status)
    finally:
        gc.freeze()
        gc.enable()


async def _take_over(cfg: Config, server: Server, metrics: Metrics,
                     on_serving: Callable[[int], None],
                     on_channel: Callable[[socket.socket], None],
                     task_status: trio.TaskStatus[int]) -> None:
    path = cfg.proxy.takeover_socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise TakeoverRefused(f"nothing serves on the takeover channel {path}: "
                              f"{exc.strerror or exc}") from exc
    ok, pid, uid = peer_allowed(sock)
    if not ok:
        sock.close()
        raise TakeoverRefused(f"takeover peer pid {pid} runs as uid {uid}")
    ch = Channel(sock, cfg.proxy.upgrade_timeout)
    inherited_channel: socket.socket | None = None
    generation = 0
    serving = False
    try:
        try:
            await ch.send(Message(MsgType.HELLO, {"pid": os.getpid(), "version": __version__}))
            welcome = await ch.recv(MsgType.WELCOME)
            generation = field_of(welcome, "generation", int) + 1
            # SO_PEERCRED names whoever created the listening socket (maybe an older
            # generation); the pid that matters is the one that answered.
            pid = field_of(welcome, "pid", int)
            signalled_at = field_of(welcome, "signalled_at", (int, float))
            log.set_generation(generation)
            metrics.generation.labels().set(generation)
            lst = await ch.recv(MsgType.LISTENERS)
            keys = field_of(lst, "listeners", list)
            if len(keys) != len(lst.fds) or not all(isinstance(k, str) for k in keys):
                for fd in lst.fds:
                    os.close(fd)
                raise ProtocolError("LISTENERS: one fd per listener")
            inherited = {k: socket.socket(fileno=fd) for k, fd in zip(keys, lst.fds, strict=True)}
            inherited_channel = inherited.pop(
                listener_key(TAKEOVER_LISTENER, str(path)), None)
            await fault_point("new", "before_ready")
            server.open_listeners(inherited)
        except CHANNEL_ERRORS as exc:
            raise TakeoverRefused(f"takeover failed before ready: {type(exc).__name__}: {exc}"
                                  ) from exc
        task_status.started(generation)
        await ch.send(Message(MsgType.READY))
        log.info("phase", phase=Phase.TAKING_OVER.value, old_pid=pid)
        adopted = 0
        while True:
            msg = await ch.recv(MsgType.CONNS, MsgType.RELEASED, MsgType.DONE, timeout=math_inf)
            if msg.type is MsgType.CONNS:
                batch = parse_conns(msg)
                await fault_point("new", "after_conns")
                conns = [server.adopt(r.listener, r.mode, r.client, r.server, fds, r.state)
                         for r, fds in batch]
                await ch.send(Message(MsgType.ACK, {"ids": [r.id for r, _ in batch]}))
                for c in conns:
                    server.resume(c)
                adopted += len(conns)
                await fault_point("new", "after_ack")
            elif msg.type is MsgType.RELEASED:
                metrics.restore(msg.head.get("metrics", {}))
                metrics.upgrades.labels("success").inc()
                metrics.upgrade_duration.labels().observe(max(0.0, time.time() - signalled_at))
                pidfile.write_status(cfg.proxy.pidfile, "success")
                serving = True
                adopt_stderr()
                on_serving(generation)
                log.info("takeover_serving", old_pid=pid, adopted=adopted)
                await fault_point("new", "after_released")
            else:
                metrics.restore(msg.head.get("metrics", {}))
                log.info("takeover_done", old_pid=pid, adopted=adopted)
                break
    except CHANNEL_ERRORS as exc:
        if not serving and generation == 0:
            raise TakeoverRefused(f"takeover failed: {exc}") from exc
        # The old generation died or broke the channel after we were ready: keep what we
        # received and serve fully.
        adopt_stderr()
        log.warning("takeover_old_lost", reason=f"{type(exc).__name__}: {exc}")
        if not serving:
            metrics.upgrades.labels("success").inc()
            on_serving(generation)
    finally:
        ch.close()
    if inherited_channel is None:
        inherited_channel = bind_channel(path)
    on_channel(inherited_channel)


math_inf = float("inf")


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
