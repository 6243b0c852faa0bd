"""One generation's serving machinery: listeners, accept loops, the connection table, drain.

Nurseries (STYLE habit 3): accept loops run under `accept_scope`, a cancel scope of their own, so
"stop accepting" is cancelling it and the listening sockets stay open (the next generation holds
copies of them). Connection handlers run in `handlers`, a nursery hosted by a separate task that
lives until the generation stops; draining is a deadline on it. A connection handed over to the
next generation is paused and removed from the table, never cancelled.

Fd ownership: listening sockets belong to the `Server` (closed by `close_listeners()`); an
accepted client socket belongs to its handler until a `Relay` is built, then to the relay; a
paused relay belongs to the upgrader, which closes it once the next generation acknowledged it or
resumes it here (`resume_exported()`). The upgrader speaks records and ids only: `pick_movable`,
`export`, `acknowledge`, `resume_exported` on the old side, `adopt` and `start` on the new one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from proxy import linger, loads, log, sockopts, upstream
from proxy.config import Address, Config, Listener
from proxy.forward import Relay
from proxy.h11impl import h11
from proxy.http import Hold, HttpClient, HttpSide, Pool, UpConn
from proxy.loads import Loads
from proxy.metrics import Metrics
from proxy.movable import PairSnapshot, State
from proxy.takeover import ConnRecord

# Accept errors that mean "out of a resource", not "this client failed": back off and keep
# serving. (The same set trio's serve_listeners and HAProxy treat as capacity problems.)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Accept errors about one connection that died in the backlog: skip it.
ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BACKOFF_MAX = 1.0

METRICS_LISTENER = "__metrics__"
TAKEOVER_LISTENER = "__takeover__"


class SideListeners(Protocol):
    """Listening sockets of another kind served with the listeners (migrate.MigrationSide):
    taken from a hot upgrade or bound, handed to the next one, accepting while we accept."""

    def open(self, inherited: dict[str, socket.socket]) -> None: ...  # pops what it takes

    def sockets(self) -> dict[str, socket.socket]: ...

    async def serve(self) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class ListenerRuntime:
    cfg: Listener
    sock: socket.socket
    http: HttpSide | None = None
    active: int = 0
    capacity: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Conn:
    id: int
    listener: str
    mode: str
    client: str
    lr: ListenerRuntime | None
    handler: Relay | HttpClient | None = None  # None while a tcp pair is still connecting
    server: upstream.ServerState | None = None


def listener_key(name: str, addr: Address | str) -> str:
    return f"{name}@{addr}"


def bind_tcp(addr: Address, backlog: int, freebind: bool = False) -> socket.socket:
    """`freebind`: bind even while the address is not local (a [migration] address: the
    host that does not hold it yet is ready the moment it arrives)."""
    fam = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:
            sock.setsockopt(socket.IPPROTO_IP if fam == socket.AF_INET else socket.IPPROTO_IPV6,
                            upstream.IP_FREEBIND if fam == socket.AF_INET
                            else upstream.IPV6_FREEBIND, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def sock_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))


class Server:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.listeners: dict[str, ListenerRuntime] = {}
        self.metrics_sock: socket.socket | None = None
        self.conns: dict[int, Conn] = {}
        self.busy = 0  # work in progress that cannot move yet (connecting, a metrics request)
        self.balancers = {n: upstream.Balancer(u) for n, u in cfg.upstreams.items()}
        self.pools = {n: Pool(u) for n, u in cfg.upstreams.items()}
        self.hold = Hold()  # set during a handover: idle http clients wait to be moved
        self.handlers: trio.Nursery | None = None
        self.accept_scope = trio.CancelScope()
        self.accepting = False
        self.listeners_closed = False
        self.accept_traffic = True  # False in a supervisor: its workers accept, it hosts /metrics
        self.loads: Loads | None = None  # a worker: the generation's shared load table
        self.changed = trio.lowlevel.ParkingLot()  # woken when a conn ends or becomes movable
        self._ids = itertools.count(1)
        self._exported: dict[int, Conn] = {}  # paused and sent, not acknowledged: still ours
        self._exported_mode: dict[int, str] = {}  # as what each went (http_exchange: mid-body)
        self._adopted: dict[int, Conn] = {}  # received, not started yet
        self._adopted_accepts: dict[int, tuple[str, socket.socket]] = {}  # (listener, client)
        self._handlers_scope = trio.CancelScope()
        self.metrics_handler: Callable[[socket.socket], Awaitable[None]] | None = None
        self.side: SideListeners | None = None  # host migration's sockets (migrate.py)

    # ---- listeners ---------------------------------------------------------------------------

    def open_listeners(self, inherited: dict[str, socket.socket]) -> None:
        """Take each configured listener from `inherited` (keyed by `listener_key`) or bind it;
        close inherited sockets the config no longer has. Raises OSError when a bind fails
        (after closing what it opened)."""
        inherited = dict(inherited)
        try:
            for lst in self.cfg.listeners:
                sock = inherited.pop(listener_key(lst.name, lst.listen), None)
                how = "inherited"
                if sock is None:
                    sock = bind_tcp(lst.listen, lst.backlog, self.cfg.moves(lst.listen.host))
                    how = "bound"
                sock.setblocking(False)
                self.listeners[lst.name] = ListenerRuntime(lst, sock, self._http_side(lst))
                self.metrics.connections_active.labels(lst.name)
                self.metrics.connections_accepted.labels(lst.name)
                log.info("listening", listener=lst.name, addr=sock_addr(sock), mode=lst.mode,
                         how=how)
            if self.cfg.metrics is not None:
                addr = self.cfg.metrics.listen
                sock = inherited.pop(listener_key(METRICS_LISTENER, addr), None)
                how = "inherited"
                if sock is None:
                    sock, how = bind_tcp(addr, 128), "bound"
                sock.setblocking(False)
                self.metrics_sock = sock
                log.info("metrics_listening", addr=sock_addr(sock), how=how)
            if self.side is not None:
                self.side.open(inherited)
        except BaseException:
            self.close_listeners()
            raise
        finally:
            for key, sock in inherited.items():
                log.info("listener_closed", key=key, reason="not in config")
                sock.close()

    def _http_side(self, lst: Listener) -> HttpSide | None:
        if lst.mode != "http":
            return None
        bal = self.balancers[lst.upstream]
        return HttpSide(lst, bal.cfg, bal, self.pools[lst.upstream], self.metrics, self.hold,
                        self.changed.unpark_all, self._count_connect_failure(bal), self.spawn)

    def listener_sockets(self) -> dict[str, socket.socket]:
        """Every listening socket keyed by `listener_key`, for the takeover channel."""
        out = {listener_key(lr.cfg.name, lr.cfg.listen): lr.sock for lr in self.listeners.values()}
        if self.cfg.metrics is not None and self.metrics_sock is not None:
            out[listener_key(METRICS_LISTENER, self.cfg.metrics.listen)] = self.metrics_sock
        if self.side is not None:
            out.update(self.side.sockets())
        return out

    def close_listeners(self) -> None:
        """Close every listening socket (a graceful stop: new connects are refused). Accepting
        never starts again after this."""
        self.listeners_closed = True
        socks = [lr.sock for lr in self.listeners.values()]
        if self.metrics_sock is not None:
            socks.append(self.metrics_sock)
        for sock in socks:
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)
                sock.close()
        if self.side is not None:
            self.side.close()

    # ---- accepting ---------------------------------------------------------------------------

    async def accept_all(self) -> None:
        """Run every accept loop until `stop_accepting()` (restartable: a rollback calls it
        again). A no-op while already accepting."""
        if self.accepting or self.listeners_closed:
            return
        scope = self.accept_scope = trio.CancelScope()
        self.accepting = True
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for lr in self.listeners.values() if self.accept_traffic else ():
                        nursery.start_soon(self._accept_loop, lr.sock, lr)
                    if self.metrics_sock is not None:
                        nursery.start_soon(self._accept_loop, self.metrics_sock, None)
                    if self.side is not None:
                        nursery.start_soon(self.side.serve)
        finally:
            if self.accept_scope is scope:
                self.accepting = False

    def stop_accepting(self) -> None:
        self.accepting = False
        self.accept_scope.cancel()

    async def _accept_loop(self, lsock: socket.socket, lr: ListenerRuntime | None) -> None:
        backoff = 0.01
        while True:
            if lr is not None and self.loads is not None and self.loads.ahead(len(self.conns)):
                await trio.sleep(loads.DELAY)  # another worker holds fewer: let it go first
            if lr is not None and lr.http is None and lr.active >= lr.cfg.max_connections:
                log.warning("max_connections", listener=lr.cfg.name, active=lr.active)
                lr.capacity = trio.Event()
                await lr.capacity.wait()
            try:
                csock, addr = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                # Woken in the same pass as stop_accepting() cancelled us: do not accept one
                # more (it would be counted after the handover's metrics snapshot).
                await trio.lowlevel.checkpoint_if_cancelled()
                continue
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept_backoff", errno=errno.errorcode[exc.errno or 0], delay=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = 0.01
            csock.setblocking(False)
            assert self.handlers is not None
            if lr is None:
                if self.metrics_handler is None:
                    csock.close()
                else:
                    self.handlers.start_soon(self.metrics_handler, csock)
            else:
                self._accepted(lr, csock, addr)
            await trio.lowlevel.checkpoint()

    def _accepted(self, lr: ListenerRuntime, csock: socket.socket, addr: tuple[str, int]) -> None:
        try:
            sockopts.apply(csock, lr.cfg.sockopts)
        except OSError:  # the client already went away
            csock.close()
            return
        self.metrics.connections_accepted.labels(lr.cfg.name).inc()
        assert self.handlers is not None
        client = str(Address(*addr[:2]))
        if lr.http is not None and lr.active >= lr.cfg.max_connections:
            # http: refuse politely rather than leave the client hanging in the backlog.
            self.handlers.start_soon(self._busy, _reject_503(csock, lr.cfg, self.metrics))
            return
        conn = Conn(next(self._ids), lr.cfg.name, lr.cfg.mode, client, lr)
        self._add(conn)
        if lr.http is not None:
            conn.handler = HttpClient(lr.http, csock, client)
            self.handlers.start_soon(self.run_handler, conn)
        else:
            self.handlers.start_soon(self._handle_tcp, conn, csock)

    # ---- the connection table ----------------------------------------------------------------

    def _add(self, conn: Conn) -> None:
        self.conns[conn.id] = conn
        if conn.lr is not None:
            conn.lr.active += 1
        self.metrics.connections_active.labels(conn.listener).inc()
        if self.loads is not None:
            self.loads.set(len(self.conns))

    def forget(self, conn: Conn) -> None:
        """Remove a conn this generation no longer holds (closed, or acknowledged by the next)."""
        if self.conns.pop(conn.id, None) is None:
            return
        if conn.lr is not None:
            conn.lr.active -= 1
            if conn.lr.active < conn.lr.cfg.max_connections:
                conn.lr.capacity.set()
        if conn.server is not None:
            conn.server.active -= 1
        self.metrics.connections_active.labels(conn.listener).dec()
        if self.loads is not None:
            self.loads.set(len(self.conns))
        self.changed.unpark_all()

    async def _busy(self, work: Awaitable[None]) -> None:
        with self.working():
            await work

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Count work in progress that cannot move to the next generation (this generation
        waits for it before exiting)."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self.changed.unpark_all()

    async def _handle_tcp(self, conn: Conn, csock: socket.socket) -> None:
        lr = conn.lr
        assert lr is not None
        bal = self.balancers[lr.cfg.upstream]
        try:
            with self.working():  # a connect in progress cannot move to the next generation
                usock, conn.server = await upstream.connect(bal, self._count_connect_failure(bal))
        except upstream.NoUpstream as exc:
            log.warning("no_upstream", listener=conn.listener, client=conn.client, reason=str(exc))
            csock.close()
            self.forget(conn)
            return
        except BaseException:
            csock.close()
            self.forget(conn)
            raise
        conn.handler = self._relay(conn.listener, csock, usock, None, lr.cfg)
        log.debug("conn_open", id=conn.id, listener=conn.listener, client=conn.client,
                  server=str(conn.server.addr))
        self.changed.unpark_all()
        await self.run_handler(conn)

    def _count_connect_failure(self, bal: upstream.Balancer) -> Callable[[Address], None]:
        fam = self.metrics.upstream_connect_failures

        def count(addr: Address) -> None:
            fam.labels(bal.cfg.name, str(addr)).inc()

        return count

    def _relay(self, listener: str, csock: socket.socket, usock: socket.socket,
               state: PairSnapshot | None, cfg: Listener | None) -> Relay:
        b = self.metrics.bytes
        return Relay(csock, usock, state=state, spawn=self.spawn,
                     splice=cfg.splice if cfg else True,
                     idle_timeout=cfg.idle_timeout if cfg else 0.0,
                     count_c2u=b.labels(listener, "client_to_upstream").inc,
                     count_u2c=b.labels(listener, "upstream_to_client").inc)

    async def run_handler(self, conn: Conn) -> None:
        """Run (or resume) a conn's handler. A paused one stays in the table for the upgrader;
        an http connection that became a tunnel carries on as a tcp relay."""
        while conn.handler is not None:
            state = await conn.handler.run()
            if state is State.TUNNEL and isinstance(conn.handler, HttpClient):
                assert conn.handler.tunnel is not None
                conn.handler, conn.mode = conn.handler.tunnel, "tunnel"
                self.changed.unpark_all()
                continue
            if state is State.CLOSED:
                reason = getattr(conn.handler, "close_reason", "eof")
                (log.debug if reason == "eof" else log.info)(
                    "conn_closed", id=conn.id, listener=conn.listener, reason=reason)
                self.forget(conn)
            return

    # ---- moving connections (the upgrader speaks records and ids, never Conn) ----------------

    def pick_movable(self, max_conns: int, max_fds: int, exchanges: bool = True) -> list[int]:
        """Ids of up to `max_conns` movable connections whose fds fit in `max_fds`.
        `exchanges`: http connections mid-exchange too (the peer speaks protocol 3)."""
        out: list[int] = []
        nfds = 0
        for c in self.conns.values():
            if c.handler is None or not c.handler.movable():
                continue
            mid = isinstance(c.handler, HttpClient) and c.handler.exchange_movable()
            if mid and not exchanges:
                continue
            k = 2 if mid else len(c.handler.fds())
            if nfds + k > max_fds or len(out) >= max_conns:
                break
            out.append(c.id)
            nfds += k
        return out

    async def export(self, ids: list[int]) -> tuple[list[ConnRecord], list[int]]:
        """Pause these connections and describe them: records and their fds (still ours, for
        SCM_RIGHTS copies) for those that did not finish meanwhile. They stay in the table,
        paused, until `acknowledge()` or `resume_exported()`."""
        conns = [self.conns[i] for i in ids if i in self.conns]
        for c in conns:
            assert c.handler is not None
            c.handler.request_pause()  # all at once: one scheduler pass stops the whole batch
        records: list[ConnRecord] = []
        fds: list[int] = []
        for c in conns:
            assert c.handler is not None
            snap = await c.handler.pause()
            if snap is None:  # finished on its own meanwhile; run_handler forgets it
                continue
            server = str(c.server.addr) if c.server is not None else ""
            exchange = c.handler.exchange_state() if isinstance(c.handler, HttpClient) else None
            mode = "http_exchange" if exchange is not None else c.mode
            records.append(ConnRecord(c.id, c.listener, mode, c.client,
                                      exchange.server if exchange else server, snap, exchange))
            fds.extend(c.handler.fds())
            self._exported[c.id] = c
            self._exported_mode[c.id] = mode
        return records, fds

    def acknowledge(self, ids: tuple[int, ...] | list[int]) -> int:
        """The next generation owns these now: close our copies and forget them."""
        n = 0
        for cid in ids:
            c = self._exported.pop(cid, None)
            mode = self._exported_mode.pop(cid, "")
            if c is None or c.handler is None:
                continue
            c.handler.close()
            self.forget(c)
            self.metrics.handover_connections.labels(mode or c.mode).inc()
            n += 1
        return n

    def resume_exported(self) -> int:
        """Resume here every exported connection nobody acknowledged (a rollback)."""
        conns = list(self._exported.values())
        self._exported.clear()
        self._exported_mode.clear()
        for c in conns:
            self.spawn(self.run_handler, c)
        return len(conns)

    def adopt(self, rec: ConnRecord, fds: list[int]) -> int:
        """A connection received from the previous generation: in the table, not running yet
        (`start()` runs it). Takes ownership of `fds` (closed here on any error)."""
        socks = []
        try:
            for fd in fds:
                socks.append(socket.socket(fileno=fd))
        except BaseException:
            for fd in fds[len(socks):]:
                os.close(fd)
            for sk in socks:
                sk.close()
            raise
        lr = self.listeners.get(rec.listener)
        conn = Conn(next(self._ids), rec.listener, rec.mode, rec.client, lr)
        state = rec.state
        if rec.mode == "http" and lr is not None and lr.http is not None:
            conn.handler = HttpClient(lr.http, socks[0], rec.client,
                                      buffered=state.c2u.pending, eof=state.c2u.eof)
        elif rec.mode == "http_exchange" and lr is not None and lr.http is not None:
            assert rec.exchange is not None
            conn.mode = "http"
            xbal = self.balancers[lr.cfg.upstream]
            server = xbal.state_of(rec.exchange.server) or _gone_server(rec.exchange.server)
            up = UpConn(socks[1], h11.Connection(h11.CLIENT), server)
            try:
                conn.handler = HttpClient(lr.http, socks[0], rec.client,
                                          exchange=(rec.exchange, state, up))
            except ValueError:
                for sk in socks:
                    sk.close()
                raise
        elif rec.mode == "accepted":
            self._adopted_accepts[conn.id] = (rec.listener, socks[0])
            return conn.id
        elif rec.mode in ("http", "http_exchange"):  # the listener is gone: close, never run
            for sk in socks:
                sk.close()
            log.warning("adopt_dropped", listener=rec.listener,
                        reason="no http listener by that name")
            return conn.id
        else:
            bal = self.balancers.get(lr.cfg.upstream) if lr else None
            conn.server = bal.state_of(rec.server) if bal else None
            if conn.server is not None:
                conn.server.active += 1
            conn.handler = self._relay(rec.listener, socks[0], socks[1], state,
                                       lr.cfg if lr else None)
        self._add(conn)
        self._adopted[conn.id] = conn
        return conn.id

    def drop_adopted(self) -> None:
        """Close adopted connections never started (their batch was not ACKed: the previous
        generation still owns them and resumes its own copies)."""
        for c in list(self._adopted.values()):
            if c.handler is not None:
                c.handler.close()
            self.forget(c)
        self._adopted.clear()
        for _, sock in self._adopted_accepts.values():
            sock.close()
        self._adopted_accepts.clear()

    def start(self, ids: list[int]) -> None:
        """Run adopted connections."""
        for cid in ids:
            c = self._adopted.pop(cid, None)
            if c is not None:
                self.spawn(self.run_handler, c)
            elif cid in self._adopted_accepts:
                name, sock = self._adopted_accepts.pop(cid)
                self.accept_now(name, sock)

    # ---- the listen backlog (host migration) -------------------------------------------------

    def take_backlog(self) -> list[tuple[ConnRecord, socket.socket]]:
        """Every connection still queued on our listeners, accepted now and not handled: what a
        host migration moves with the rest once the addresses are gone (no new one can come).
        Records of mode "accepted"; the sockets are the caller's."""
        out = []
        for lr in self.listeners.values():
            while lr.sock.fileno() >= 0:
                try:
                    csock, addr = lr.sock.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                out.append((ConnRecord(next(self._ids), lr.cfg.name, "accepted",
                                       str(Address(addr[0], addr[1])), "", PairSnapshot()),
                            csock))
        return out

    def accept_now(self, listener: str, sock: socket.socket) -> None:
        """Handle a client connection accepted elsewhere (a backlog that moved, or one taken
        back on a rollback) as if our accept loop had just taken it."""
        lr = self.listeners.get(listener)
        try:
            addr = sock.getpeername()
        except OSError:
            addr = None
        if lr is None or addr is None:
            sock.close()
            return
        sock.setblocking(False)
        self._accepted(lr, sock, addr)

    async def sweep_idle(self) -> None:
        """One task for every pair's idle_timeout: look at each relay a few times per timeout."""
        timeouts = [lst.idle_timeout for lst in self.cfg.listeners if lst.idle_timeout > 0]
        if not timeouts:
            return
        interval = max(0.05, min(timeouts) / 4)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for c in list(self.conns.values()):
                if isinstance(c.handler, Relay):
                    c.handler.check_idle(now)

    def close_idle(self) -> None:
        """Graceful stop: idle keep-alive http clients close now, busy ones after their
        response (nginx and HAProxy do the same)."""
        for c in self.conns.values():
            if isinstance(c.handler, HttpClient):
                c.handler.request_close()

    def holds_nothing(self) -> bool:
        return not self.conns and self.busy == 0

    async def wait_changed(self) -> None:
        await self.changed.park()

    # ---- hosting handlers and draining -------------------------------------------------------

    async def host_handlers(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Host the handler nursery until `stop_handlers()`."""
        with self._handlers_scope:
            async with trio.open_nursery() as nursery:
                self.handlers = nursery
                task_status.started()
                await trio.sleep_forever()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a task in the handler nursery (relays run their second pump there)."""
        assert self.handlers is not None
        self.handlers.start_soon(fn, *args)

    def stop_handlers(self) -> None:
        self._handlers_scope.cancel()

    async def drain(self, timeout: float) -> bool:
        """Wait until this generation holds nothing, up to `timeout`; True when it emptied."""
        with trio.move_on_after(timeout):
            while not self.holds_nothing():
                await self.wait_changed()
            return True
        return False


async def _reject_503(sock: socket.socket, cfg: Listener, metrics: Metrics) -> None:
    """Answer 503 to a client above `max_connections` and close: a lingering close (its request
    is unread), counted as work in progress by the caller, bounded by lingering_time."""
    body = b"503 too many connections\n"
    msg = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
           b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    metrics.http_requests.labels(cfg.name, "503").inc()
    try:
        sock.send(msg)  # a fresh socket's send buffer holds it whole
    except OSError:
        sock.close()
        return
    if linger.wanted(cfg.lingering_close, sock, request_read=False, eof=False):
        await linger.linger_close(sock, cfg)
    else:
        sock.close()


def _gone_server(name: str) -> upstream.ServerState:
    """A server an adopted exchange talks to that our config no longer has: counted apart."""
    host, _, port = name.rpartition(":")
    return upstream.ServerState(Address(host.strip("[]"), int(port) if port.isdigit() else 0))
