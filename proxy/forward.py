"""The tcp relay: one client/upstream pair, two pumps, and pause / snapshot / resume.

A `Relay` owns two connected, non-blocking stdlib sockets and moves bytes both ways until both
directions have reached EOF (each propagated with `shutdown(SHUT_WR)`, so half-close works), an
error ends the pair, or the pair stays idle for `idle_timeout` (checked by the generation's
sweeper calling `check_idle()`: one task for all pairs, not one per pair).

Theory of operation (why pause is always safe)
-----------------------------------------------
Each direction is a `Direction`: the bytes read from its source and not yet written to its
destination (`pending`, plus `in_pipe` bytes parked in a splice pipe), whether the source reached
EOF, and whether the destination was shut. The pumps use raw non-blocking `recv`/`send`/`splice`
calls and update that state synchronously right after each call; their only awaits are trio's
`wait_readable` / `wait_writable` / `checkpoint`, which hold no partial state. So cancelling the
pumps at any await leaves a state that describes every byte exactly: nothing was half-written
(a short `send` keeps its unsent remainder in `pending`), nothing read was dropped.

`pause()` cancels the pumps, waits for them to stop, reads back whatever sits in the splice pipes
into `pending`, and returns a `PairSnapshot` of plain values. `Relay(..., state=snapshot)` built
around the same kernel sockets (in this process or, after SCM_RIGHTS, in the next generation)
carries on from exactly there: no byte is lost, duplicated or reordered.

Zero-copy: a direction starts with `recv`/`send` (best for small messages); once a `recv` fills
the whole buffer the direction switches to `os.splice` through its own pipe, and back to copying
when a splice brings in little. The pipe is created on first use.

Fd ownership: the Relay owns both sockets. `run()` closes them when the pair finishes; when the
pair was paused they stay open and belong to whoever called `pause()` (who then either closes
them with `close()`, after the next generation acknowledged its copies, or calls `run()` again).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from proxy import log
from proxy.movable import DirectionSnapshot, PairSnapshot, State

RECV_SIZE = 65536  # a recv this full marks a direction as bulk: it switches to splice
PIPE_SIZE = 1 << 20  # splice pipe capacity asked for (fs.pipe-max-size caps it)
SPLICE_SMALL = 16384  # a splice that brings in less than this switches back to copying
# A pump that never has to wait yields to the other tasks after this many writes. (Not after
# every write: a small message's round trip blocks anyway, and each extra pass through the
# scheduler costs as much as the syscalls. Its waits are checkpoints, so pause() is never late.)
YIELD_EVERY = 16
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAVE_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

ByteCount = Callable[[int], None]
Spawn = Callable[..., object]  # a nursery's start_soon: where a relay runs its second pump


@dataclass(eq=False)
class Direction:
    name: str
    src: socket.socket
    dst: socket.socket
    count: ByteCount
    pending: bytearray = field(default_factory=bytearray)
    eof: bool = False
    shut: bool = False
    moved: int = 0  # bytes written to dst by this relay (check_idle() reads it)
    bulk: bool = False
    pipe: tuple[int, int] | None = None
    in_pipe: int = 0

    def snapshot(self) -> DirectionSnapshot:
        return DirectionSnapshot(bytes(self.pending), self.eof, self.shut)

    def unpipe(self) -> None:
        """Read the bytes parked in the splice pipe back into `pending` (pumps must be stopped)."""
        while self.in_pipe and self.pipe is not None:
            chunk = os.read(self.pipe[0], self.in_pipe)
            if not chunk:  # cannot happen while we hold the write end; guard the loop anyway
                raise RuntimeError("splice pipe lost bytes")
            self.pending += chunk
            self.in_pipe -= len(chunk)

    def close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class PeerGone(Exception):
    """A socket of the pair failed (reset, broken pipe, keepalive timeout...): the pair ends."""


def _noop(n: int) -> None:
    pass


class Relay:
    """One client/upstream pair. See the module docstring for the pause/resume contract."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        state: PairSnapshot | None = None,
        splice: bool = True,
        idle_timeout: float = 0.0,
        count_c2u: ByteCount = _noop,
        count_u2c: ByteCount = _noop,
        spawn: Spawn,
    ) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        self.client = client
        self.upstream = upstream
        self.splice = splice and _HAVE_SPLICE
        self.idle_timeout = idle_timeout
        self.c2u = Direction("c2u", client, upstream, count_c2u)
        self.u2c = Direction("u2c", upstream, client, count_u2c)
        state = state or PairSnapshot()
        for d, s in ((self.c2u, state.c2u), (self.u2c, state.u2c)):
            d.pending += s.pending
            d.eof, d.shut = s.eof, s.shut
        self.state = State.NEW
        self.close_reason = ""
        self.spawn = spawn
        self._scopes: tuple[trio.CancelScope, ...] = (trio.CancelScope(),)
        self._live = 0
        self._stopped = trio.Event()
        self._pausing = False
        self._seen_moved = -1  # check_idle(): bytes moved when last looked at, and since when
        self._seen_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> State:
        """Relay until the pair finishes (returns CLOSED, fds closed) or is paused (PAUSED).

        The u2c pump runs in this task, the c2u pump in a task given to `spawn` (the caller's
        nursery), each under a cancel scope of its own: no nursery per pair. (A nursery and
        its cancel-status bookkeeping cost as much as the pumps' own work when ten thousand
        pairs are paused or resumed in one handover.) This task returns only after the other
        pump has stopped too."""
        if self.state in (State.RUNNING, State.CLOSED):
            raise RuntimeError(f"run() on a {self.state.value} relay")
        self.state = State.RUNNING
        self._stopped = trio.Event()
        self._pausing = False
        self._seen_moved = -1
        # Created before the first await, so a pause() that comes in at any point finds them.
        self._scopes = (trio.CancelScope(), trio.CancelScope())
        self._live = 2
        other_done = trio.Event()
        try:
            self.spawn(self._direction, self.c2u, self._scopes[0], other_done)
        except BaseException:  # the nursery is closing (shutdown): nothing will run the pair
            self.close()
            self._stopped.set()
            raise
        try:
            await self._direction(self.u2c, self._scopes[1], None)
            await other_done.wait()
        finally:
            if not other_done.is_set():  # cancelled from outside: stop the other pump first
                self._cancel_all()
                with trio.CancelScope(shield=True):
                    await other_done.wait()
            if self._pausing and not self.close_reason:
                self.state = State.PAUSED
            else:
                self.close()
            self._stopped.set()
        return self.state

    async def _direction(self, d: Direction, scope: trio.CancelScope,
                         done: trio.Event | None) -> None:
        try:
            with scope:
                try:
                    await self._pump(d)
                except PeerGone as exc:
                    self.close_reason = self.close_reason or str(exc)
                    self._cancel_all()
                    return
                self._live -= 1
                if self._live == 0:
                    self.close_reason = self.close_reason or "eof"
        finally:
            if done is not None:
                done.set()

    def _cancel_all(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    def request_pause(self) -> None:
        """Ask the pumps to stop (no wait); `pause()` then collects the snapshot. Lets a caller
        stop a whole batch of relays in one scheduler pass."""
        if self.state is State.RUNNING:
            self._pausing = True
            self._cancel_all()

    async def pause(self) -> PairSnapshot | None:
        """Stop both pumps at a safe point and return the pair's state.

        Returns None when the pair finished on its own meanwhile (nothing to hand over; its fds
        are closed). Otherwise the relay is PAUSED and its fds stay open for the caller.
        """
        if self.state is State.RUNNING:
            self.request_pause()
            await self._stopped.wait()
        if self.state is State.CLOSED:
            return None
        self.state = State.PAUSED
        for d in (self.c2u, self.u2c):
            d.unpipe()
            d.close_pipe()
        return PairSnapshot(self.c2u.snapshot(), self.u2c.snapshot())

    def close(self) -> None:
        """Close both sockets and pipes (idempotent)."""
        self.state = State.CLOSED
        for d in (self.c2u, self.u2c):
            d.close_pipe()
        self.client.close()
        self.upstream.close()

    def movable(self) -> bool:
        return self.state is State.RUNNING

    def fds(self) -> tuple[int, ...]:
        """The two fds (client, upstream) for SCM_RIGHTS; the relay keeps owning them."""
        return self.client.fileno(), self.upstream.fileno()

    # ---- the pumps ---------------------------------------------------------------------------

    def check_idle(self, now: float) -> None:
        """Close the pair when no byte moved either way for `idle_timeout` (0: never). The
        generation's sweeper calls this every fraction of the timeout."""
        moved = self.c2u.moved + self.u2c.moved
        if moved != self._seen_moved:
            self._seen_moved, self._seen_at = moved, now
        elif (self.idle_timeout > 0 and self.state is State.RUNNING
              and now - self._seen_at >= self.idle_timeout):
            self.close_reason = "idle_timeout"
            self._cancel_all()

    async def _pump(self, d: Direction) -> None:
        src, dst = d.src, d.dst
        streak = 0  # writes done without blocking; we yield to others every YIELD_EVERY
        drained = False  # the last read came up short: the socket is most likely empty now
        while True:
            try:
                if d.pending:
                    try:
                        n = dst.send(d.pending)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst)
                        continue
                    del d.pending[:n]
                    d.moved += n
                    d.count(n)
                    streak += 1
                    if streak >= YIELD_EVERY:
                        streak = 0
                        await trio.lowlevel.checkpoint()
                elif d.in_pipe:
                    assert d.pipe is not None
                    try:
                        n = os.splice(d.pipe[0], dst.fileno(), d.in_pipe, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst)
                        continue
                    d.in_pipe -= n
                    d.moved += n
                    d.count(n)
                    streak += 1
                    if streak >= YIELD_EVERY:
                        streak = 0
                        await trio.lowlevel.checkpoint()
                elif d.eof:
                    if not d.shut:
                        d.shut = True
                        _shutdown_write(dst)
                    return
                elif d.bulk:
                    pipe = d.pipe or _open_pipe(d)
                    try:
                        n = os.splice(src.fileno(), pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(src)
                        continue
                    if n == 0:
                        d.eof = True
                    d.in_pipe += n
                    d.bulk = n >= SPLICE_SMALL
                else:
                    if drained:  # skip the read that would only say EAGAIN: wait first
                        drained = False
                        await trio.lowlevel.wait_readable(src)
                    try:
                        data = src.recv(RECV_SIZE)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(src)
                        continue
                    if not data:
                        d.eof = True
                    d.pending += data
                    d.bulk = self.splice and len(data) == RECV_SIZE
                    drained = 0 < len(data) < RECV_SIZE
            except OSError as exc:  # BlockingIOError never gets here: each call site handles it
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                raise PeerGone(f"{d.name}:{name}") from exc


def _open_pipe(d: Direction) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # an unprivileged process may not exceed fs.pipe-max-size; the default works
        log.debug("pipe_size_default")
    d.pipe = (r, w)
    return d.pipe


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # the peer already went away entirely: nothing to shut
            raise

