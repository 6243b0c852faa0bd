"""Host migration: every connection and the moving addresses of this host's proxy go to the
proxy of another host, over an authenticated TCP channel, with TCP_REPAIR.

The session is the takeover's (`takeover.Session`, version negotiation, CONNS batches in an ACK
window, ABORT), carried by `migwire.Wire` (mutual HMAC authentication, every frame
authenticated) instead of a Unix socket, and with `repair.SocketDump`s where the takeover sends
fds. B's side of a session is `migrate_in.take`. `MigrationSide` plugs into the `Server`
(`Server.side`): it owns two listening sockets served with the listeners (so a hot upgrade
hands them over like the others):
- `[migration] listen`, TCP: where a peer migrates its connections to us (we are "B");
- the control socket `<takeover_socket>.migrate`, Unix, mode 0600, SO_PEERCRED checked: where
  `python -m proxy migrate --to HOST:PORT` asks this proxy to migrate away (we are "A"). One
  JSON line each way: {"to": "host:port"} -> {"ok": bool, "moved": N, "ms": X, "reason": ...}.

Theory of operation (A gives, B takes; B's role in the session is "new", A's "old")
----------------------------------------------------------------------------------
 1. A checks it can (a [migration] section, CAP_NET_ADMIN and CAP_NET_RAW, the moving addresses
    local, no upgrade under way), opens netlink and ARP sockets, connects to B, authenticates.
 2. HELLO (B) / WELCOME (A) / LISTENERS (A: the moving addresses, which must be B's too) /
    READY (B: it checked its capabilities and opened its netlink and ARP sockets).
 3. A stops accepting, holds idle http clients, closes its idle pooled upstream connections
    (waiting, bounded, for the server's FIN while the source address is still here), and waits
    (up to MOVABLE_WAIT) until every connection is movable with both sockets ESTABLISHED:
    connects to an upstream in progress, requests not at a pausable point and half-closed pairs
    finish on A first. Still some left: the migration fails, nothing moved.
 4. A pauses every connection at once (no handler runs between the check and the pause), then
    the freeze: it arms the replay capture and removes the moving addresses (from here its
    kernel drops their packets silently), sends RELEASED, then a batch at a time: TCP_REPAIR=1
    and dump each socket, send CONNS with the dumps; B restores every socket (in repair mode:
    nothing on the wire, nothing running) and ACKs. A keeps its own sockets, paused and in
    repair mode, until the end.
 5. A sends DONE: the commit. A closes its sockets (in repair mode: silently). B adds the
    addresses, sends gratuitous ARP, leaves repair mode on every socket, resumes every
    connection, and reports (REPORT: counts, times, its MACs). A re-sends to those MACs what it
    captured for the moving addresses during the freeze (the replay: the peers need not wait for
    their retransmission timeout), answers the CLI and exits.
Failure before DONE was sent (B unreachable, refuses the key, aborts, dies, times out, sends
garbage; an error of ours): A re-adds the addresses, leaves repair mode on its own sockets and
resumes everything; B closes what it restored (still in repair mode: silently). So everything
is served on A, and clients saw a pause. After DONE everything is B's: if B dies between reading
DONE and going live, the connections are lost with it (the same as B dying a moment later).
Only one host holds the addresses at a time, so a migration moves everything or nothing.

Not moved (finished on A before the freeze, step 3): connects in progress, half-closed pairs,
requests at a point that cannot pause. Clients that connected after A stopped accepting wait in
its listen backlog: once the addresses are gone A accepts them, and they move as records of mode
"accepted" that B handles as new connections (on a rollback, A handles them).

Metrics: B counts `proxy_migrations_total{result="success"}` and
`proxy_migrated_connections_total` when it goes live; A counts `{result="failed"}` (it keeps
serving; on success it exits).

Fd ownership: A's sockets stay with their handlers (`Server.export`) and are closed by
`Server.acknowledge()` after DONE, or resumed. B's restored sockets go to `Server.adopt()`
at once (closed by `drop_adopted()` on failure). The side's listening sockets belong to the
`MigrationSide` (`close()`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from proxy import __version__, log, migrate_in, pidfile, repair
from proxy.channel import bind_channel, peer_allowed
from proxy.config import Address, Config, parse_address
from proxy.faults import fault_point
from proxy.gcpause import gc_paused
from proxy.metrics import Metrics
from proxy.migchannel import (
    AUTH_TIMEOUT,
    MOVABLE_WAIT,
    POOL_CLOSE_WAIT,
    MigChannel,
    MigrationError,
    describe,
)
from proxy.migwire import Wire
from proxy.netaddr import AddressError, Addresses, parse_moving
from proxy.server import Server, bind_tcp, listener_key
from proxy.takeover import (
    Ack,
    ConnRecord,
    Conns,
    Done,
    Hello,
    Listeners,
    Ready,
    Released,
    Role,
    Session,
    Welcome,
)

MIGRATION_LISTENER = "__migration__"
CONTROL_LISTENER = "__control__"
CONNECT_TIMEOUT = 5.0  # A -> B's migration port
REPORT_WAIT = 10.0  # after DONE, B's word that it is live
BATCH = 128  # connections per CONNS batch
WINDOW = 4  # batches in flight
CONTROL_MAX = 4096  # a control request's bound


def control_path(cfg: Config) -> Path:
    p = cfg.proxy.takeover_socket
    return p.with_name(p.name + ".migrate")


# ---- the side listeners and the two roles ---------------------------------------------------

@dataclass(eq=False)
class _Moving:
    """A's state during one migration: what it paused, to resume on a failure."""

    records: list[ConnRecord] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    dump_s: float = 0.0
    socks: list[socket.socket] = field(default_factory=list)  # in repair mode, still the handlers'
    accepted: int = 0  # the last `accepted` of records/socks came from the backlog: ours to close


class MigrationSide:
    """The migration listener and the control socket of one generation (see the module
    docstring). `busy` / `on_freeze` / `on_resume` / `on_exit` are the generation's hooks."""

    def __init__(self, cfg: Config, server: Server, metrics: Metrics,
                 can_start: Callable[[], str], on_freeze: Callable[[], None],
                 on_resume: Callable[[], None], on_exit: Callable[[], None]) -> None:
        self.cfg = cfg
        self.server = server
        self.metrics = metrics
        self.can_start = can_start  # "" or why a migration cannot start now (an upgrade...)
        self.on_freeze, self.on_resume, self.on_exit = on_freeze, on_resume, on_exit
        self.listen_sock: socket.socket | None = None
        self.control_sock: socket.socket | None = None
        self.active = False  # one migration (either role) at a time

    # ---- Server.side -------------------------------------------------------------------------

    def open(self, inherited: dict[str, socket.socket]) -> None:
        """Take our sockets from `inherited` (a hot upgrade) or bind them."""
        m = self.cfg.migration
        if m is None:  # (`proxy migrate` then fails at once, in the CLI: nothing to ask)
            return
        path = control_path(self.cfg)
        ctl = inherited.pop(listener_key(CONTROL_LISTENER, str(path)), None)
        self.control_sock = ctl if ctl is not None else bind_channel(path)
        self.control_sock.setblocking(False)
        sock = inherited.pop(listener_key(MIGRATION_LISTENER, m.listen), None)
        how = "inherited" if sock is not None else "bound"
        self.listen_sock = sock if sock is not None else bind_tcp(m.listen, 16)
        self.listen_sock.setblocking(False)
        log.info("migration_listening", addr=_addr(self.listen_sock), how=how)

    def sockets(self) -> dict[str, socket.socket]:
        out = {}
        if self.control_sock is not None:
            out[listener_key(CONTROL_LISTENER, str(control_path(self.cfg)))] = self.control_sock
        if self.listen_sock is not None and self.cfg.migration is not None:
            out[listener_key(MIGRATION_LISTENER, self.cfg.migration.listen)] = self.listen_sock
        return out

    def close(self) -> None:
        for sock in (self.listen_sock, self.control_sock):
            if sock is not None and sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def serve(self) -> None:
        """Accept loops (run by `Server.accept_all`, so cancelled when it stops accepting);
        each session runs in the handler nursery, so stopping accepting does not cut it."""
        async with trio.open_nursery() as nursery:
            if self.control_sock is not None:
                nursery.start_soon(self._accept, self.control_sock, self._control)
            if self.listen_sock is not None:
                nursery.start_soon(self._accept, self.listen_sock, self._incoming)

    async def _accept(self, lsock: socket.socket,
                      handler: Callable[[socket.socket], Any]) -> None:
        while True:
            await trio.lowlevel.wait_readable(lsock)
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                continue
            sock.setblocking(False)
            self.server.spawn(handler, sock)

    # ---- A: the control socket and the migration away ------------------------------------------

    async def _control(self, sock: socket.socket) -> None:
        reply: dict[str, Any] = {}
        try:
            ok, pid, uid = peer_allowed(sock)
            if not ok:
                log.warning("migrate_control_refused", peer_pid=pid, peer_uid=uid)
                return
            try:
                with trio.fail_after(AUTH_TIMEOUT):
                    req = await _read_line(sock)
                obj = json.loads(req)
                to = parse_address("to", obj["to"])
                replay = bool(obj.get("replay", True))
            except Exception as exc:
                reply = {"ok": False, "reason": f"bad control request: {exc}"}
            else:
                reply = await self.migrate_to(to, replay)
            with contextlib.suppress(OSError), trio.move_on_after(AUTH_TIMEOUT):
                await _write_all(sock, json.dumps(reply).encode() + b"\n")
        finally:
            sock.close()
        if reply.get("ok"):
            self.on_exit()

    async def migrate_to(self, to: Address, replay: bool = True) -> dict[str, Any]:
        """Migrate everything to the peer at `to`; the reply for the CLI. `replay`: re-send
        to the peer what arrived for the moving addresses during the freeze."""
        why = self._why_not()
        if why:
            log.error("migration_refused", to=str(to), reason=why)
            return {"ok": False, "reason": why}
        self.active = True
        try:
            moved, ms = await self._migrate(to, replay)
        except MigrationError as exc:
            self.metrics.migrations.labels("failed").inc()
            log.error("migration_failed", to=str(to), reason=str(exc))
            return {"ok": False, "reason": str(exc)}
        finally:
            self.active = False
        return {"ok": True, "moved": moved, "ms": ms}

    def _why_not(self) -> str:
        m = self.cfg.migration
        if m is None:
            return "no [migration] section in the config"
        caps = migrate_in.missing_caps()
        if caps:
            return f"missing capabilities {' and '.join(caps)} (run as root or grant them)"
        if self.active:
            return "a migration is already under way"
        return self.can_start()

    async def _migrate(self, to: Address, replay: bool) -> tuple[int, float]:
        m = self.cfg.migration
        assert m is not None
        moving = tuple(parse_moving(a) for a in m.addresses)
        try:
            addrs = Addresses(moving, capture=replay)
        except (AddressError, OSError) as exc:
            raise MigrationError(f"cannot open netlink/ARP sockets: {exc}") from exc
        try:
            missing = {a.key for a in moving} - addrs.local()
            if missing:
                raise MigrationError(f"moving addresses not on this host: {sorted(missing)}")
            self._phase("connecting", to=str(to))
            ch = await _connect(to, m.key)
            try:
                return await self._give(ch, addrs, moving)
            finally:
                ch.close()
        finally:
            addrs.close()

    def _phase(self, phase: str, **fields: Any) -> None:
        log.info("migration_phase", phase=phase, **fields)

    async def _give(self, ch: MigChannel, addrs: Addresses, moving: tuple[Any, ...]
                    ) -> tuple[int, float]:
        srv = self.server
        self._phase("handshake")
        hello, _ = await ch.receive()
        if not isinstance(hello, Hello) or ch.session.version is None:
            raise MigrationError("no common protocol version with the peer")
        await ch.send(Welcome(os.getpid(), 1, time.time(), time.time(), __version__,
                              ch.session.version))
        await ch.send(Listeners(tuple(a.key for a in moving)))
        ready, _ = await ch.receive()
        if not isinstance(ready, Ready):
            raise MigrationError(f"expected READY, got {type(ready).__name__}")
        state = _Moving()
        frozen = False
        self.on_freeze()
        srv.stop_accepting()
        srv.hold.hold()
        try:
            await fault_point("migrate_out", "before_freeze")
            await self._wait_movable()
            # Idle pooled upstream connections do not move: close them while the source address
            # is still here and wait for the server's FIN (after the move its late packets
            # would reach B, which knows nothing of them, and answer RST). An exchange that
            # ends meanwhile gives its connection back: another round.
            for _ in range(3):
                if not await _close_pools(srv):
                    break
                await self._wait_movable()
            # From the check above to the pause below nothing awaits: no handler runs between,
            # so none starts a request (or a connect) that the freeze would cut. Paused first,
            # then the addresses go: while handlers stop (~70 us each) the kernel still takes
            # and acknowledges the peers' bytes, so that time is no loss window.
            with gc_paused():  # (a collection in the freeze is a stall for every client)
                tp = time.monotonic()
                await self._pause_all(state)
                t0 = time.monotonic()
                addrs.start_capture()  # (the replay: what arrives from now on is kept)
                addrs.remove()
                frozen = True
                # No SYN reaches us now: what sits in the listen backlog (connected since we
                # stopped accepting) moves too, as connections B handles as new ones.
                for rec, sock in srv.take_backlog():
                    if not _established(sock.fileno()):  # the client already closed: done
                        log.info("migration_backlog_closed", client=rec.client)
                        sock.close()
                        continue
                    state.records.append(rec)
                    state.socks.append(sock)
                    state.accepted += 1
                self._phase("freeze", connections=len(state.records),
                            pause_ms=round((t0 - tp) * 1000, 1))
                await ch.send(Released({}))
                await self._send_all(ch, state)
                dumped_ms = (time.monotonic() - t0) * 1000
                await ch.send(Done({}))
        except BaseException as exc:
            reason = (str(exc) if isinstance(exc, MigrationError)
                      else f"{type(exc).__name__}: {exc}")
            with trio.CancelScope(shield=True):
                await ch.abort(reason)
                self._roll_back(addrs if frozen else None, state)
            if isinstance(exc, MigrationError | AddressError | repair.RepairError | OSError):
                raise MigrationError(reason) from exc
            raise
        # Committed: B owns everything. Our sockets close in repair mode (nothing on the wire).
        cut = len(state.socks) - state.accepted
        for s in state.socks[:cut]:
            s.detach()  # (the handlers' fds: acknowledge() closes them)
        for s in state.socks[cut:]:
            s.close()
        state.socks.clear()
        state.ids = [r.id for r in state.records[:len(state.records) - state.accepted]]
        n = srv.acknowledge(state.ids) + state.accepted
        self._phase("committed", moved=n, sent_ms=round(dumped_ms, 1),
                    dump_ms=round(state.dump_s * 1000, 1))
        try:
            report = await ch.receive_report(REPORT_WAIT)
        except MigrationError as exc:
            report = {}
            log.warning("migration_no_report", reason=str(exc))
        ms = round((time.monotonic() - t0) * 1000, 1)
        macs = report.get("macs")
        replayed = addrs.replay({str(k): str(v) for k, v in macs.items()}
                                if isinstance(macs, dict) else {})
        self._phase("done", moved=n, freeze_ms=ms, peer_freeze_ms=report.get("freeze_ms", ""),
                    peer_resumed=report.get("resumed", ""), replayed=replayed)
        with contextlib.suppress(OSError):
            self.cfg.proxy.takeover_socket.unlink(missing_ok=True)
            control_path(self.cfg).unlink(missing_ok=True)
        pidfile.remove_if_mine(self.cfg.proxy.pidfile)
        return n, ms

    async def _wait_movable(self) -> None:
        """Step 3: until every connection can move (bounded); MigrationError otherwise."""
        srv = self.server
        with trio.move_on_after(min(MOVABLE_WAIT, self.cfg.proxy.drain_timeout or MOVABLE_WAIT)):
            while True:
                left = _unmovable(srv)
                if not left and srv.busy == 0:
                    return
                await trio.sleep(0.02)  # (a half-close is no table change: poll)
        raise MigrationError(f"{len(_unmovable(srv))} connections (and {srv.busy} requests or "
                             "connects) could not reach a movable point in time")

    async def _pause_all(self, state: _Moving) -> None:
        """Pause every connection at once (`Server.export` asks them all before it waits)."""
        srv = self.server
        ids = srv.pick_movable(len(srv.conns) + 1, 1 << 30, True)
        state.records, fds = await srv.export(ids)
        state.ids = [r.id for r in state.records]
        for fd in fds:
            # The handler's fd: wrapped to set options, detached (never closed) by us.
            state.socks.append(socket.socket(fileno=fd))
        if srv.conns.keys() - set(state.ids):
            raise MigrationError(f"{len(srv.conns.keys() - set(state.ids))} connections "
                                 "stopped being movable during the freeze")

    async def _send_all(self, ch: MigChannel, state: _Moving) -> None:
        """TCP_REPAIR dumps and CONNS batches, up to the session's window ahead of the ACKs."""
        nrec = nfd = 0
        while nrec < len(state.records) or ch.session.unacked:
            if nrec < len(state.records) and ch.session.can_send_conns():
                batch = state.records[nrec:nrec + BATCH]
                k = sum(r.nfds for r in batch)
                dumps = []
                t = time.perf_counter()
                for s in state.socks[nfd:nfd + k]:
                    repair.enter_repair(s)
                    dumps.append(repair.dump(s))
                state.dump_s += time.perf_counter() - t
                await ch.send(Conns(tuple(batch)), dumps)
                await fault_point("migrate_out", "after_conns")
                nrec, nfd = nrec + len(batch), nfd + k
                continue
            event, _ = await ch.receive()
            if not isinstance(event, Ack):
                raise MigrationError(f"expected ACK, got {type(event).__name__}")

    def _roll_back(self, addrs: Addresses | None, state: _Moving) -> None:
        """Serve everything here again: addresses back, repair mode off, handlers resumed."""
        srv = self.server
        if addrs is not None:
            try:
                addrs.add()
                addrs.announce()
            except AddressError as exc:
                log.error("migration_rollback_address", reason=str(exc))
        cut = len(state.socks) - state.accepted
        for i, s in enumerate(state.socks):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, repair.TCP_REPAIR_OFF)
            if i < cut:
                s.detach()
            else:  # from the backlog: handled here after all
                srv.accept_now(state.records[i - cut + len(state.records) - state.accepted]
                               .listener, s)
        state.socks.clear()
        srv.hold.release()
        kept = srv.resume_exported()
        self._phase("rolled_back", resumed=kept)
        srv.spawn(srv.accept_all)
        self.on_resume()

    # ---- B: taking a peer's connections --------------------------------------------------------

    async def _incoming(self, sock: socket.socket) -> None:
        m = self.cfg.migration
        peer = _peer(sock)
        if m is None:
            sock.close()
            return
        ch = MigChannel(sock, Wire("B", m.key), Session(Role.NEW, carries_fds=False))
        try:
            try:
                await ch.handshake()
            except MigrationError as exc:
                log.warning("migration_peer_refused", peer=peer, reason=str(exc))
                return
            if self.active:
                await ch.abort("a migration is already under way here")
                log.warning("migration_peer_refused", peer=peer, reason="busy")
                return
            self.active = True
            try:
                await migrate_in.take(self.cfg, self.server, self.metrics, ch, peer)
            except MigrationError as exc:
                log.error("migration_in_failed", peer=peer, reason=str(exc))
            finally:
                self.active = False
        finally:
            ch.close()


def _unmovable(srv: Server) -> list[int]:
    """Ids of connections that cannot move now: not at a pausable point, or a socket not
    ESTABLISHED (half-closed or closing: those finish here)."""
    out = []
    for c in srv.conns.values():
        h = c.handler
        if h is None or not h.movable() or not all(_established(fd) for fd in h.fds()):
            out.append(c.id)
    return out


async def _close_pools(srv: Server) -> int:
    """Close every idle pooled upstream connection gracefully: our FIN, then wait (bounded)
    for the server's, so the close completes while the address is ours. Returns how many."""
    ups = []
    for pool in srv.pools.values():
        for q in pool.idle.values():
            while q:
                up = q.pop()
                with contextlib.suppress(OSError):
                    up.sock.shutdown(socket.SHUT_WR)
                ups.append(up)
    with trio.move_on_after(POOL_CLOSE_WAIT):
        while ups and not all(_eof(up.sock) for up in ups):
            await trio.sleep(0.005)
    for up in ups:
        up.close()
    return len(ups)


def _eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _established(fd: int) -> bool:
    s = socket.socket(fileno=fd)
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == repair.TCP_ESTABLISHED
    except OSError:
        return False
    finally:
        s.detach()


async def _connect(to: Address, key: bytes) -> MigChannel:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tsock = trio.socket.socket(
                socket.AF_INET6 if ":" in to.host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                await tsock.connect((to.host, to.port))
            except BaseException:
                tsock.close()
                raise
    except (OSError, trio.TooSlowError) as exc:
        raise MigrationError(f"cannot reach the migration peer {to}: {describe(exc)}") from exc
    sock = socket.socket(fileno=tsock.detach())
    ch = MigChannel(sock, Wire("A", key), Session(Role.OLD, carries_fds=False))
    try:
        await ch.handshake()
    except BaseException:
        ch.close()
        raise
    return ch


async def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        if len(buf) > CONTROL_MAX:
            raise ValueError("request too long")
        try:
            data = sock.recv(CONTROL_MAX)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0]


async def _write_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[n:]


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return str(Address(host, port))


def install(cfg: Config, server: Server, metrics: Metrics, upgrader: Any,
            exit_now: trio.Event) -> MigrationSide:
    """Give `server` its migration side (generation.py calls this once, before listening).
    `upgrader` (upgrade.Upgrader): no migration while an upgrade is under way, and no upgrade
    starts during a migration (a SIGUSR2 then is queued, and carried out if it rolls back)."""

    def can_start() -> str:
        if upgrader.attempt is not None or not upgrader.serving:
            return "a hot upgrade is under way (or this generation does not serve)"
        return ""

    def on_freeze() -> None:
        upgrader.serving = False

    def on_resume() -> None:
        upgrader.serving = True
        upgrader.became_serving(upgrader.generation, False)

    def on_exit() -> None:
        log.info("migrated_exit", reason="every connection moved to the peer")
        exit_now.set()

    side = MigrationSide(cfg, server, metrics, can_start, on_freeze, on_resume, on_exit)
    server.side = side
    return side


# ---- the CLI side ----------------------------------------------------------------------------

def request(cfg: Config, to: str, timeout: float, replay: bool = True) -> dict[str, Any]:
    """`python -m proxy migrate`: ask the local proxy (over its control socket) to migrate to
    `to`; its reply. Raises OSError when no proxy answers there."""
    path = control_path(cfg)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"to": to, "replay": replay}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    if not buf.strip():
        raise OSError(f"the proxy closed the control socket {path} without an answer")
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise OSError("malformed reply on the control socket")
    return reply
