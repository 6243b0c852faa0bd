"""The h11 adapter: one client connection in http mode, its upstream exchanges, the pool.

`HttpClient` serves one client connection: keep-alive and pipelining (h11 SERVER side), each
request forwarded to an upstream connection (h11 CLIENT side) taken from a per-server `Pool` or
connected with failover; bodies are streamed both ways a read at a time (memory stays bounded
whatever the body size) and re-framed by h11, never passed through raw. An `Upgrade` answered
with 101 turns the pair into a tcp `Relay` (forward.py), carrying h11's unprocessed bytes of
both sides over as pending data.

Errors get a short body and a closed connection: 400 malformed (h11's hint), 431 head too big,
408 head too slow (`header_timeout`), 502 no server reachable or a broken upstream, 504 no
response head within `response_timeout`, 503 (in server.py) above `max_connections`. An error
answered before the request was read whole ends with a lingering close (linger.py: half-close,
read and discard for a bounded time, then close): the client's unread input would otherwise
turn our close into a reset that overtakes the answer. A request with ambiguous framing is
refused before anything reaches a backend (headers.framing_problem).
A request whose pooled connection turns out dead before any response byte is retried once on a
fresh connection when it is idempotent and has no body; connect failures fail over (nothing sent).

Handover: like a `Relay`, an `HttpClient` has `request_pause()` / `pause()` / `fds()` / `close()`,
but it pauses only at an idle point between requests: a request in progress completes first.
Its snapshot is the bytes h11 read but did not process yet (pipelined requests, a partial head)
and whether the client sent EOF, in `c2u`. Idle pooled upstream connections are not handed
over: they carry no client state, the next generation may point elsewhere, and closing an
idle keep-alive connection loses nothing. They close when the old generation exits.

Fd ownership: the HttpClient owns the client socket (closed on finish, kept when paused, given to
the Relay on a tunnel); an upstream connection belongs to the exchange using it, then to the pool.
"""

from __future__ import annotations

import collections
import contextlib
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from proxy import headers as hdr
from proxy import linger, log
from proxy.bodypump import PeerClosed, flush, pump_body
from proxy.config import Address, Listener, Upstream
from proxy.forward import Relay
from proxy.framing import BodyFramer, FramingError, Kind, framer_for
from proxy.h11impl import h11
from proxy.metrics import Metrics
from proxy.movable import DirectionSnapshot, ExchangeState, PairSnapshot, State
from proxy.upstream import Balancer, NoUpstream, ServerState, connect

RECV_SIZE = 65536
PEEK_AFTER = 1.0  # seconds idle after which a pooled connection is checked before reuse


class Hold:
    """Set by the upgrader during a handover: idle clients stop reading and wait to be moved."""

    def __init__(self) -> None:
        self.active = False
        self.released = trio.Event()

    def hold(self) -> None:
        if not self.active:
            self.active = True
            self.released = trio.Event()

    def release(self) -> None:
        self.active = False
        self.released.set()


@dataclass(eq=False)
class UpConn:
    sock: socket.socket
    conn: h11.Connection
    server: ServerState
    since: float = 0.0
    reused: bool = False

    def close(self) -> None:
        self.sock.close()


class Pool:
    """Idle keep-alive upstream connections, per server, most recent first."""

    def __init__(self, cfg: Upstream) -> None:
        self.cfg = cfg
        self.idle: dict[Address, collections.deque[UpConn]] = collections.defaultdict(
            collections.deque)

    def take(self, addr: Address, now: float) -> UpConn | None:
        q = self.idle.get(addr)
        while q:
            up = q.pop()
            idle = now - up.since
            # A server closes idle connections after seconds, not milliseconds: look for its
            # FIN only on connections idle for a while (a miss is retried, see _exchange).
            if idle > self.cfg.pool_idle_timeout or (idle > PEEK_AFTER and not _still_idle(up.sock)):
                up.close()
                continue
            up.reused = True
            return up
        return None

    def give(self, up: UpConn, now: float) -> None:
        q = self.idle[up.server.addr]
        while q and now - q[0].since > self.cfg.pool_idle_timeout:
            q.popleft().close()
        if len(q) >= self.cfg.pool_max_idle:
            up.close()
            return
        up.since = now
        q.append(up)


def _still_idle(sock: socket.socket) -> bool:
    """An idle upstream connection must have nothing to read: EOF or stray bytes mean dead."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # EOF, or bytes nobody asked for


@dataclass
class HttpSide:
    """What an HttpClient needs from its generation (built once per listener by server.py)."""

    listener: Listener
    upstream: Upstream
    balancer: Balancer
    pool: Pool
    metrics: Metrics
    hold: Hold
    changed: Callable[[], object]
    on_connect_failure: Callable[[Address], None]
    spawn: Callable[..., object]  # the handler nursery's start_soon (a tunnel's second pump)
    count_c2u: Callable[[int], None] = field(init=False)
    count_u2c: Callable[[int], None] = field(init=False)

    def __post_init__(self) -> None:
        b = self.metrics.bytes
        self.count_c2u = b.labels(self.listener.name, "client_to_upstream").inc
        self.count_u2c = b.labels(self.listener.name, "upstream_to_client").inc


class Retry(Exception):
    """A reused upstream connection died before any response byte: try a fresh one."""


class UpstreamBroken(Exception):
    """The upstream failed mid-exchange (after the response head went to the client)."""


class ClientGone(Exception):
    """The client closed or reset while its request body was still coming."""


class Paused(Exception):
    """A raw exchange stopped at a safe point to move to the next generation."""


async def _recv_waiting(sock: socket.socket) -> bytes:
    """Wait for the socket to be readable, then read. (Waiting first: when we get here we have
    just asked the peer for something, so a read now would only find nothing.)"""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            continue


def _pairs(headers: h11._headers.Headers) -> hdr.Headers:
    """h11's headers as a plain list of (lower-case name, value). h11's Headers is a Sequence
    without __iter__, so iterating it goes through __getitem__ per item; its `_full_items`
    list is the fast way in (with the public, slower way as the fallback)."""
    full = getattr(headers, "_full_items", None)
    if full is None:
        return list(headers)
    return [(name, value) for _, name, value in full]


def _head_size(req: h11.Request) -> int:
    """The request head's size on the wire, near enough (line ends and separators counted)."""
    return (len(req.method) + len(req.target) + 12
            + sum(len(k) + len(v) + 4 for k, v in req.headers.raw_items()))


class HttpClient:
    """One http-mode client connection. See the module docstring for the handover contract."""

    def __init__(self, side: HttpSide, sock: socket.socket, client: str, *,
                 buffered: bytes = b"", eof: bool = False,
                 exchange: tuple[ExchangeState, PairSnapshot, UpConn] | None = None) -> None:
        sock.setblocking(False)
        self.side = side
        self.sock = sock
        self.client = client
        self.client_ip = client.rsplit(":", 1)[0].strip("[]")
        self.conn = self._new_conn(buffered, eof)
        self.state = State.NEW
        self.idle = False
        self.requests = 0
        self.tunnel: Relay | None = None
        self.raw: RawExchange | None = None  # the exchange in progress on the raw body path
        if exchange is not None:  # adopted mid-exchange (ValueError: an impossible state)
            self.raw = RawExchange.from_state(self, *exchange)
            self.requests = 1  # (its next request waits keepalive_timeout, not header_timeout)
        self._pausing = False
        self._closing = False
        self._answered_error = False  # an error response went out: the close may linger
        self._idle_scope = trio.CancelScope()  # cancels only the wait for a request head
        self._stopped = trio.Event()

    def _new_conn(self, buffered: bytes | bytearray = b"", eof: bool = False) -> h11.Connection:
        """A fresh h11 server connection (each request cycle after a raw body starts one),
        fed the bytes already read for it."""
        conn = h11.Connection(h11.SERVER,
                              max_incomplete_event_size=self.side.listener.max_header_size)
        if buffered:
            conn.receive_data(bytes(buffered))
        if eof:
            conn.receive_data(b"")
        return conn

    # ---- the handover interface (as Relay's) -------------------------------------------------

    def movable(self) -> bool:
        return self.state is State.RUNNING and (
            self.idle or (self.raw is not None and self.raw.pausable))

    def exchange_movable(self) -> bool:
        """Movable, and only mid-exchange (a peer speaking protocol 3 or later can take it)."""
        return self.movable() and not self.idle

    def request_pause(self) -> None:
        self._pausing = True
        if self.state is State.RUNNING and self.idle:
            self._idle_scope.cancel()
        elif self.state is State.RUNNING and self.raw is not None and self.raw.pausable:
            self.raw.scope.cancel()

    def request_close(self) -> None:
        """Graceful stop: close at the next idle point (now, if idle)."""
        self._closing = True
        if self.state is State.RUNNING and self.idle:
            self._idle_scope.cancel()

    async def pause(self) -> PairSnapshot | None:
        """Stop at the next idle point and return the unprocessed client bytes; None if the
        connection ended (or became a tunnel) meanwhile."""
        if self.state is State.RUNNING:
            self.request_pause()
            await self._stopped.wait()
        if self.state is not State.PAUSED:
            return None
        if self.raw is not None:
            return self.raw.pair_snapshot()
        data, closed = self.conn.trailing_data
        return PairSnapshot(c2u=DirectionSnapshot(pending=bytes(data), eof=closed))

    def exchange_state(self) -> ExchangeState | None:
        """Paused mid-exchange: what the next generation needs besides the two sockets."""
        return self.raw.state() if self.raw is not None and self.state is State.PAUSED else None

    def fds(self) -> tuple[int, ...]:
        if self.raw is not None and self.state is State.PAUSED:
            return self.sock.fileno(), self.raw.up.sock.fileno()
        return (self.sock.fileno(),)

    def close(self) -> None:
        self.state = State.CLOSED
        self.sock.close()
        if self.raw is not None:
            self.raw.up.close()

    # ---- serving ------------------------------------------------------------------------------

    async def run(self) -> State:
        """Serve requests until the connection closes (CLOSED), pauses at an idle point
        (PAUSED) or becomes a tunnel (TUNNEL: `self.tunnel` holds the Relay)."""
        if self.state in (State.RUNNING, State.CLOSED):
            raise RuntimeError(f"run() on a {self.state.value} http client")
        self.state = State.RUNNING
        self._stopped = trio.Event()
        self._pausing = False
        result = State.CLOSED
        try:
            try:
                result = await self._serve()
            except Paused:
                result = State.PAUSED
            if result is State.CLOSED and self._should_linger():
                # Not movable meanwhile (not idle): a generation waits for it as for a request
                # in progress, which linger_close bounds by lingering_time.
                await linger.linger_close(self.sock, self.side.listener)
        except (OSError, h11.ProtocolError, UpstreamBroken, ClientGone, FramingError,
                Retry) as exc:
            log.debug("http_conn_error", client=self.client, error=repr(exc))
        finally:
            self.idle = False
            if result is State.CLOSED:
                self.close()
            self.state = result
            self._stopped.set()
        return result

    def _should_linger(self) -> bool:
        if not self._answered_error:
            return False
        data, eof = self.conn.trailing_data
        read_whole = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE) and not data
        if self.raw is not None:  # h11 never saw a raw body: its framer knows
            read_whole = self.raw.req_framer.done and not self.raw.after
        return linger.wanted(self.side.listener.lingering_close, self.sock,
                             request_read=read_whole, eof=eof)

    async def _serve(self) -> State:
        if self.raw is not None:  # adopted mid-exchange: finish it first
            await self._run_raw(self.raw)
            if not (self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE):
                return State.CLOSED
        while True:
            req = await self._next_request()
            if isinstance(req, State):
                return req
            self.requests += 1
            tunnel = await self._exchange(req)
            if tunnel is not None:
                self.tunnel = tunnel
                return State.TUNNEL
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            elif not (self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE):
                return State.CLOSED  # (IDLE/IDLE: a raw exchange kept it alive, see _raw)

    async def _next_request(self) -> h11.Request | State:
        """Wait (movable) for the next request head. CLOSED on EOF, timeout or a bad head."""
        lst = self.side.listener
        now = trio.current_time()
        idle_deadline = now + (lst.keepalive_timeout if self.requests else lst.header_timeout)
        head_deadline: float | None = None
        while True:
            if self._pausing:  # asked while the last exchange ended: buffered requests move
                return State.PAUSED
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._error(exc.error_status_hint, str(exc))
                return State.CLOSED
            if isinstance(event, h11.Request):
                # h11's limit only catches a head still incomplete past it; one that arrived
                # whole in a single read is measured here.
                if _head_size(event) > lst.max_header_size:
                    await self._error(431, "request head larger than max_header_size")
                    return State.CLOSED
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed (or PAUSED after a bad cycle)
                return State.CLOSED
            if self._pausing:
                return State.PAUSED
            if self._closing:
                return State.CLOSED
            partial = bool(self.conn.trailing_data[0])
            if partial and head_deadline is None:
                head_deadline = trio.current_time() + lst.header_timeout
            deadline = head_deadline if head_deadline is not None else idle_deadline
            # Idle: the only place a pause may interrupt. Its own scope, so a pause that comes
            # in after the socket turned readable cannot hit the request that follows.
            self.idle = True
            held = self.side.hold.active
            # One scope for both the idle deadline and a pause or close (those set a flag first).
            timer = self._idle_scope = trio.CancelScope(deadline=math.inf if held else deadline)
            self.side.changed()
            with timer:
                if held:  # a handover is under way: do not start a request, wait to be moved
                    await self.side.hold.released.wait()
                else:
                    await trio.lowlevel.wait_readable(self.sock)
            self.idle = False
            if self._pausing:
                return State.PAUSED
            if self._closing:
                return State.CLOSED
            if held:
                continue
            if timer.cancelled_caught:
                if partial:
                    await self._error(408, "request head not received within header_timeout")
                return State.CLOSED
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            self.conn.receive_data(data)

    async def _to_client(self, *events: h11.Event) -> None:
        data = b"".join(self.conn.send(e) or b"" for e in events)
        await flush(self.sock, bytearray(data), self.side.count_u2c)

    async def _error(self, status: int, detail: str) -> None:
        """Answer with a short error and make the connection close (if a response can still be
        sent: nothing of one went out yet). The close lingers if the client may still be
        sending (see run())."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {detail}\n".encode()
        with contextlib.suppress(OSError, h11.LocalProtocolError):
            await self._to_client(
                h11.Response(status_code=status, headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]),
                h11.Data(data=body), h11.EndOfMessage())
            self._answered_error = True
        self._record(status, "-", "-", "", 0, trio.current_time())
        log.info("http_error", listener=self.side.listener.name, client=self.client,
                 status=status, detail=detail[:200])

    def _record(self, status: int, method: str, target: str, server: str, nbytes: int,
                t0: float) -> None:
        name = self.side.listener.name
        took = trio.current_time() - t0
        self.side.metrics.http_requests.labels(name, str(status)).inc()
        self.side.metrics.http_request_duration.labels(name).observe(took)
        if self.side.listener.access_log and method != "-":
            log.info("access", listener=name, client=self.client, method=method, path=target,
                     status=status, bytes=nbytes, ms=round(took * 1000, 1), upstream=server)

    # ---- one exchange -------------------------------------------------------------------------

    async def _exchange(self, req: h11.Request) -> Relay | None:
        """Forward one request and its response. Returns a Relay when the pair became a
        tunnel; otherwise the client connection is left DONE/DONE (keep-alive) or not."""
        t0 = trio.current_time()
        method, target = req.method.decode("latin-1"), req.target.decode("latin-1")
        headers = _pairs(req.headers)
        problem = hdr.framing_problem(headers)
        if problem:
            await self._error(400, problem)
            return None
        if self.conn.they_are_waiting_for_100_continue:
            # We answer Expect ourselves (as nginx does) so the body flows at once.
            await self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
        tunnel = hdr.wants_upgrade(headers)
        up_headers = hdr.upstream_request(headers, self.client_ip, tunnel)
        length = hdr.get(headers, b"content-length")
        has_body = (length is not None and length != b"0") or (
            hdr.get(headers, b"transfer-encoding") is not None)
        retryable = hdr.idempotent(req.method) and not has_body
        fresh = False
        for _ in range(2):
            try:
                up = await self._upstream(fresh)
            except NoUpstream as exc:
                await self._error(502, str(exc))
                return None
            try:
                if tunnel:
                    return await self._tunnel(req, up_headers, up, method, target, t0)
                head = bytearray(up.conn.send(h11.Request(  # from h11's parser: _parsed
                    method=req.method, target=req.target, headers=up_headers,
                    http_version=b"1.1", _parsed=True)) or b"")
                try:
                    self.raw = RawExchange(self, req, headers, up_headers, up, head, t0)
                except FramingError as exc:  # the body bytes that came with the head
                    up.close()
                    await self._error(exc.status_hint, str(exc))
                    return None
                await self._run_raw(self.raw)
                return None
            except Retry:
                up.close()
                if not retryable:
                    break
                fresh = True
        await self._error(502, "upstream closed the connection")
        return None

    async def _run_raw(self, raw: RawExchange) -> None:
        """Run (or carry on with) a raw exchange; the bookkeeping around it: errors to
        statuses, the access log and metrics, keep-alive. Raises Paused (it moves: nothing is
        recorded here, the next generation does), Retry, ClientGone, UpstreamBroken."""
        up = raw.up
        up.server.active += 1
        paused = False
        try:
            await raw.run()
        except Paused:
            paused = True
            raise
        except ClientGone:
            up.close()
            raise
        except FramingError as exc:  # the client's request body: malformed chunked framing
            up.close()
            await self._error(exc.status_hint, str(exc))  # (counted there)
        except (OSError, UpstreamBroken, trio.TooSlowError, h11.LocalProtocolError) as exc:
            up.close()
            if not raw.sent_head and raw.status == 0:
                await self._error(502, f"upstream failed: {exc}")
                raw.status = 502
                return
            log.info("http_upstream_broken", client=self.client, error=str(exc)[:200])
            raise UpstreamBroken(str(exc)) from exc
        finally:
            up.server.active -= 1
            if not paused:
                if raw.status and raw.status not in (502, 504):
                    self._record(raw.status, raw.req.method.decode("latin-1"),
                                 raw.req.target.decode("latin-1"), str(up.server.addr),
                                 raw.nbytes, raw.t0)
                raw.finish(up)

    async def _upstream(self, fresh: bool) -> UpConn:
        side = self.side
        now = trio.current_time()
        order = side.balancer.order(now)
        if not fresh and order[0].down_until <= now:  # the balancer's choice, pooled?
            up = side.pool.take(order[0].addr, now)
            if up is not None:
                return up
        sock, server = await connect(side.balancer, side.on_connect_failure, order=order)
        server.active -= 1  # http counts in-flight requests instead (see _run_raw, _tunnel)
        return UpConn(sock, h11.Connection(h11.CLIENT), server)

    async def _tunnel(self, req: h11.Request, up_headers: hdr.Headers, up: UpConn, method: str,
                      target: str, t0: float) -> Relay | None:
        """A request asking for an Upgrade, over `up`, through h11 both ways (a Relay if the
        upstream answers 101; any other answer is passed on as a response). Bytes for a peer are
        gathered while h11 has events in hand and sent once it needs more input."""
        side = self.side
        upc = up.conn
        up.server.active += 1
        sent_head = False
        status = 0
        nbytes = 0
        try:
            out = bytearray(upc.send(h11.Request(  # headers came from h11's parser: _parsed
                method=req.method, target=req.target, headers=up_headers, http_version=b"1.1",
                _parsed=True)) or b"")
            first = True
            while True:  # the request body, streamed: one client read at a time
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as exc:
                    up.close()
                    await self._error(exc.error_status_hint, str(exc))
                    return None
                if event is h11.NEED_DATA:
                    await self._to_upstream(up, out, first)
                    first = False
                    with trio.fail_after(side.listener.idle_timeout or math.inf):
                        self.conn.receive_data(await _recv_waiting(self.sock))
                    continue
                if isinstance(event, h11.Data):
                    out += upc.send(event) or b""
                elif isinstance(event, h11.EndOfMessage):
                    out += upc.send(h11.EndOfMessage()) or b""
                    await self._to_upstream(up, out, first)
                    break
                else:
                    return None  # ConnectionClosed mid-body: nothing more to do
            # The response: head within response_timeout, then the body streamed back.
            deadline = trio.current_time() + side.listener.response_timeout
            got_any = False
            while True:
                try:
                    event = upc.next_event()
                except h11.RemoteProtocolError as exc:
                    if not sent_head and up.reused and not got_any:
                        raise Retry() from exc
                    raise UpstreamBroken(str(exc)) from exc
                if event is h11.NEED_DATA:
                    if out:
                        await flush(self.sock, out, side.count_u2c)
                    with trio.CancelScope(deadline=math.inf if sent_head else deadline) as t:
                        if sent_head and side.listener.idle_timeout:
                            t.deadline = trio.current_time() + side.listener.idle_timeout
                        chunk = await _recv_waiting(up.sock)
                    if t.cancelled_caught:
                        up.close()
                        if sent_head:
                            raise UpstreamBroken("upstream idle past idle_timeout")
                        await self._error(504, "no response within response_timeout")
                        status = 504
                        return None
                    got_any = got_any or bool(chunk)
                    upc.receive_data(chunk)
                    continue
                if isinstance(event, h11.Data):
                    nbytes += len(event.data)
                    out += self.conn.send(event) or b""
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    out += self.conn.send(h11.Response(
                        status_code=event.status_code, reason=event.reason,
                        headers=hdr.client_response(_pairs(event.headers)), _parsed=True)) or b""
                    sent_head = True
                elif isinstance(event, h11.EndOfMessage):
                    out += self.conn.send(h11.EndOfMessage()) or b""
                    await flush(self.sock, out, side.count_u2c)
                    break
                elif isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        status = 101
                        return await self._switch(event, up)
                    out += self.conn.send(h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=hdr.client_response(_pairs(event.headers)), _parsed=True)) or b""
                else:  # ConnectionClosed before the end
                    raise UpstreamBroken("upstream closed mid-response")
            return None
        except (OSError, UpstreamBroken, trio.TooSlowError, h11.LocalProtocolError) as exc:
            up.close()
            if not sent_head and status == 0:
                await self._error(502, f"upstream failed: {exc}")
                status = 502
                return None
            # The head went out already: all we can do is cut the client connection.
            log.info("http_upstream_broken", client=self.client, error=str(exc)[:200])
            raise UpstreamBroken(str(exc)) from exc
        finally:
            up.server.active -= 1
            if status and status not in (502, 504):
                self._record(status, method, target, str(up.server.addr), nbytes, t0)
            if status != 101:
                if (upc.our_state is h11.DONE and upc.their_state is h11.DONE
                        and up.sock.fileno() >= 0):
                    upc.start_next_cycle()
                    side.pool.give(up, trio.current_time())
                elif up.sock.fileno() >= 0:
                    up.close()

    async def _to_upstream(self, up: UpConn, out: bytearray, first: bool) -> None:
        """Send what is gathered for the upstream. A pooled connection that fails on its first
        write never saw the request: Retry."""
        if not out:
            return
        try:
            await flush(up.sock, out, self.side.count_c2u)
        except OSError as exc:
            if first and up.reused:
                raise Retry() from exc
            raise

    async def _switch(self, event: h11.InformationalResponse, up: UpConn) -> Relay:
        """101: answer the client, then relay both sockets as a tcp pair, h11's unprocessed
        bytes on each side carried over as pending data."""
        await self._to_client(h11.InformationalResponse(
            status_code=101, reason=event.reason,
            headers=hdr.client_response(_pairs(event.headers), tunnel=True)))
        client_extra, client_eof = self.conn.trailing_data
        up_extra, up_eof = up.conn.trailing_data
        side = self.side
        return Relay(self.sock, up.sock, splice=False, idle_timeout=side.listener.idle_timeout,
                     spawn=side.spawn,
                     count_c2u=side.count_c2u, count_u2c=side.count_u2c,
                     state=PairSnapshot(c2u=DirectionSnapshot(bytes(client_extra), client_eof),
                                        u2c=DirectionSnapshot(bytes(up_extra), up_eof)))


class RawExchange:
    """One request/response whose bodies move raw (bodypump.py): h11 parses and writes the
    heads; a BodyFramer follows each body, whose wire bytes go through unchanged.

    Phases: "request_body" (client -> upstream), "response_head" (waiting for the upstream's
    head, parsed by h11), "response_body" (upstream -> client). The response body goes raw when
    the client's framing is the upstream's: an HTTP/1.1 client and a Content-Length or chunked
    response (h11 would re-frame an until-EOF response, or any body for an HTTP/1.0 client:
    those take h11's copy path, "copy", and the client connection closes after them).

    Moving: in each of the three phases the exchange waits only at pause-safe points (see
    bodypump.py), so `scope.cancel()` stops it with a state that describes every byte:
    `pair_snapshot()` + `state()`, and `from_state()` in the next generation carries on. The
    next generation rebuilds h11's side of the heads by replaying them into fresh connections
    (never h11's private state).

    After the exchange, each side that stays open gets a fresh h11 connection fed the bytes
    read past the message (`after`: pipelined requests), since h11's own state never saw the
    bodies (`finish`).
    """

    def __init__(self, client: HttpClient, req: h11.Request, headers: hdr.Headers,
                 up_headers: hdr.Headers, up: UpConn, head: bytearray, t0: float) -> None:
        self.c = client
        self.req = req
        self.up_headers = up_headers
        self.up = up
        self.t0 = t0
        self.phase = "request_body"
        self.scope = trio.CancelScope()  # cancelled by HttpClient.request_pause()
        self.to_up = head  # the request head, then body bytes not yet written upstream
        self.after = bytearray()  # client bytes past the request body
        self.to_client = bytearray()
        self.up_after = bytearray()  # upstream bytes past the response body (keeps it out of the pool)
        self.status = 0
        self.nbytes = 0
        self.sent_head = False
        self.raw_response = False
        self.rechunk = False
        self.done = False
        self.resp_keep = False
        self.resp_framer: BodyFramer | None = None
        self._safe = True  # False around the few awaits that are not pause-safe
        self.may_retry = up.reused  # until the upstream has seen a byte of ours (or a pause)
        self.client_keep = req.http_version == b"1.1" and b"close" not in hdr.tokens(
            headers, b"connection")
        self.req_framer = framer_for(req.method, headers,
                                     max_line=client.side.listener.max_header_size)
        body0 = client.conn.trailing_data[0]
        n, _ = self.req_framer.feed(body0)
        self.to_up += body0[:n]
        self.after += body0[n:]

    @property
    def pausable(self) -> bool:
        return self._safe and self.phase in ("request_body", "response_head", "response_body")

    async def run(self) -> None:
        """Carry on from the current phase to the end; Paused if `scope` was cancelled. (A
        fresh scope each time: one that paused it may resume it here after a rollback.)"""
        self.scope = trio.CancelScope()
        if self.c._pausing:  # asked while the previous exchange was ending: stop at once
            self.scope.cancel()
        with self.scope:
            await self._run()
        if self.scope.cancelled_caught:
            self.may_retry = False
            raise Paused()

    async def _run(self) -> None:
        c, up = self.c, self.up
        side = c.side
        if self.phase == "request_body":
            try:
                head_len = len(self.to_up)
                try:
                    await flush(up.sock, self.to_up, side.count_c2u)
                except OSError as exc:
                    if self.may_retry and len(self.to_up) == head_len:
                        raise Retry() from exc  # a pooled connection dead before it saw anything
                    raise
                self.may_retry = False
                await pump_body(c.sock, up.sock, self.req_framer, self.to_up, self.after,
                                side.count_c2u, side.listener.idle_timeout)
            except PeerClosed as exc:
                raise ClientGone(str(exc)) from exc
            except trio.TooSlowError as exc:
                raise ClientGone("request body idle past idle_timeout") from exc
            self.phase = "response_head"
        if self.phase == "response_head":
            resp = await self._response_head()
            if resp is None:
                return
            self._start_response(resp)
        try:
            if self.phase == "copy":
                await self._copy_body()
                return
            assert self.resp_framer is not None
            await pump_body(up.sock, c.sock, self.resp_framer, self.to_client, self.up_after,
                            side.count_u2c, side.listener.idle_timeout, self.rechunk)
        except FramingError as exc:
            raise UpstreamBroken(f"bad response framing: {exc}") from exc
        except PeerClosed as exc:
            raise UpstreamBroken(f"upstream closed mid-response: {exc}") from exc
        except trio.TooSlowError as exc:
            raise UpstreamBroken("upstream idle past idle_timeout") from exc
        self.nbytes = self.resp_framer.payload
        self.phase = "done"
        self.done = True

    async def _response_head(self) -> h11.Response | None:
        """The upstream's response head (1xx ones forwarded); None after a 504."""
        c, up = self.c, self.up
        side = c.side
        upc = up.conn
        deadline = trio.current_time() + side.listener.response_timeout
        got_any = False
        while True:
            try:
                event = upc.next_event()
            except h11.RemoteProtocolError as exc:
                if self.may_retry and not got_any:
                    raise Retry() from exc
                raise UpstreamBroken(str(exc)) from exc
            if event is h11.NEED_DATA:
                with trio.CancelScope(deadline=deadline) as t:
                    chunk = await _recv_waiting(up.sock)
                if t.cancelled_caught:
                    self._safe = False
                    up.close()
                    await c._error(504, "no response within response_timeout")
                    self.status = 504
                    return None
                got_any = got_any or bool(chunk)
                upc.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                self._safe = False  # a 1xx head is short: sent whole, never half
                with trio.CancelScope(shield=True):
                    await flush(c.sock, bytearray(c.conn.send(h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=hdr.client_response(_pairs(event.headers)),
                        _parsed=True)) or b""), side.count_u2c)
                self._safe = True
                continue
            raise UpstreamBroken("upstream closed (or switched protocols) before a response")

    def _start_response(self, resp: h11.Response) -> None:
        """The response head is in: write it (h11 cleans its headers for this client) and pick
        the raw path or h11's copy path for the body."""
        c, up = self.c, self.up
        self.status = resp.status_code
        headers = _pairs(resp.headers)
        framer = framer_for(self.req.method, headers, resp.status_code)
        self.resp_keep = resp.http_version == b"1.1" and b"close" not in hdr.tokens(
            headers, b"connection") and framer.kind is not Kind.EOF
        self.to_client += c.conn.send(h11.Response(
            status_code=resp.status_code, reason=resp.reason,
            headers=hdr.client_response(headers), _parsed=True)) or b""
        self.sent_head = True
        http11 = self.req.http_version == b"1.1"
        if framer.kind is Kind.CHUNKED and not http11:
            self.phase = "copy"  # h11 de-chunks it for an HTTP/1.0 client: its copy path
            return
        # An until-EOF body: h11 announced chunked to an HTTP/1.1 client (we frame each read),
        # close-delimited to an HTTP/1.0 one (it closes after, as client_keep says for 1.0).
        self.rechunk = framer.kind is Kind.EOF and http11
        self.raw_response = True
        self.resp_framer = framer
        body0 = up.conn.trailing_data[0]
        try:
            n, _ = framer.feed(body0)
        except FramingError as exc:
            raise UpstreamBroken(f"bad response framing: {exc}") from exc
        if self.rechunk and n:
            self.to_client += b"%x\r\n%s\r\n" % (n, body0[:n])
        elif not self.rechunk:
            self.to_client += body0[:n]
        self.up_after += body0[n:]
        self.phase = "response_body"

    async def _copy_body(self) -> None:
        """h11's copy path (it re-frames the body for this client); the client connection
        closes after it (h11 never saw the raw request body, so no next cycle)."""
        c, upc = self.c, self.up.conn
        out = self.to_client
        self.client_keep = False
        self.resp_keep = False  # h11's client side never saw our raw request body either
        while True:
            event = upc.next_event()
            if event is h11.NEED_DATA:
                await flush(c.sock, out, c.side.count_u2c)
                with trio.fail_after(c.side.listener.idle_timeout or math.inf):
                    upc.receive_data(await _recv_waiting(self.up.sock))
                continue
            if isinstance(event, h11.Data):
                self.nbytes += len(event.data)
                out += c.conn.send(event) or b""
            elif isinstance(event, h11.EndOfMessage):
                out += c.conn.send(h11.EndOfMessage()) or b""
                await flush(c.sock, out, c.side.count_u2c)
                self.phase = "done"
                self.done = True
                return
            else:
                raise PeerClosed("upstream closed mid-response")

    def finish(self, up: UpConn) -> None:
        """Keep-alive bookkeeping once the exchange ended (well or not)."""
        c = self.c
        if self.done:
            c.raw = None
        if self.done and self.raw_response and self.client_keep:
            c.conn = c._new_conn(self.after)  # the next request cycle, pipelined bytes and all
        if (self.done and self.resp_keep and not self.up_after and up.sock.fileno() >= 0):
            up.conn = h11.Connection(h11.CLIENT)
            up.reused = False
            c.side.pool.give(up, trio.current_time())
        elif up.sock.fileno() >= 0:
            up.close()

    # ---- moving ---------------------------------------------------------------------------------

    def pair_snapshot(self) -> PairSnapshot:
        if self.phase == "response_head":  # the upstream bytes h11 has not parsed yet
            up_bytes = bytes(self.up.conn.trailing_data[0])
        else:
            up_bytes = bytes(self.to_client)
        return PairSnapshot(c2u=DirectionSnapshot(bytes(self.to_up)),
                            u2c=DirectionSnapshot(up_bytes))

    def state(self) -> ExchangeState:
        return ExchangeState(
            phase=self.phase, method=self.req.method, target=self.req.target,
            version=self.req.http_version, headers=tuple(_pairs(self.req.headers)),
            up_headers=tuple(self.up_headers), request=self.req_framer.snapshot(),
            response=self.resp_framer.snapshot() if self.resp_framer is not None else None,
            status=self.status, client_keep=self.client_keep, resp_keep=self.resp_keep,
            server=str(self.up.server.addr), elapsed=trio.current_time() - self.t0,
            after=bytes(self.after), up_after=bytes(self.up_after), rechunk=self.rechunk)

    @classmethod
    def from_state(cls, client: HttpClient, st: ExchangeState, snap: PairSnapshot,
                   up: UpConn) -> RawExchange:
        """An exchange another generation paused (see `state()`): h11's side of the heads is
        rebuilt by replaying them into fresh connections. Raises ValueError (h11 refuses the
        replayed head, or a framing snapshot is impossible)."""
        head = b"%s %s HTTP/%s\r\n%s\r\n" % (
            st.method, st.target, st.version,
            b"".join(b"%s: %s\r\n" % (k, v) for k, v in st.headers))
        conn = client._new_conn(head)
        try:
            req = conn.next_event()
            up.conn.send(h11.Request(method=st.method, target=st.target,
                                     headers=list(st.up_headers), http_version=b"1.1"))
        except h11.ProtocolError as exc:
            raise ValueError(f"replayed head refused: {exc}") from exc
        if not isinstance(req, h11.Request):
            raise ValueError("replayed head is not a whole request")
        client.conn = conn
        self = cls.__new__(cls)
        self.c, self.req, self.up_headers, self.up = client, req, list(st.up_headers), up
        self.t0 = trio.current_time() - max(0.0, st.elapsed)
        self.phase = st.phase
        self.scope = trio.CancelScope()
        self.to_up = bytearray(snap.c2u.pending)
        self.after = bytearray(st.after)
        self.to_client = bytearray()
        self.up_after = bytearray(st.up_after)
        self.status = st.status
        self.nbytes = 0
        self.sent_head = st.phase == "response_body"
        self.raw_response = st.phase == "response_body"
        self.rechunk = st.rechunk
        self.may_retry = False
        self.done = False
        self.resp_keep = st.resp_keep
        self.client_keep = st.client_keep
        self._safe = True
        self.req_framer = BodyFramer.from_snapshot(st.request)
        self.resp_framer = None
        if st.phase == "response_head":
            if snap.u2c.pending:  # (h11 reads b"" as the peer's EOF)
                up.conn.receive_data(snap.u2c.pending)
        elif st.phase == "response_body":
            if st.response is None:
                raise ValueError("response_body without its framing")
            self.resp_framer = BodyFramer.from_snapshot(st.response)
            self.to_client += snap.u2c.pending
        elif st.phase != "request_body":
            raise ValueError(f"cannot carry on an exchange in phase {st.phase!r}")
        return self
