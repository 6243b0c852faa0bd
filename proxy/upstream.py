"""Upstream server selection (pure `Balancer`) and connecting with failover (`connect`).

Selection: `round_robin` rotates the starting server per connection; `least_conn` prefers the
server with the fewest active pairs (ties broken by rotation). Passive health: a server whose
connects fail `max_fails` times in a row is skipped for `fail_timeout` seconds, then tried again;
servers cooling down are still tried, last, when no healthy one is left, so a client is never
refused without at least one connect attempt.

`connect()` tries each server at most once per client connection, `connect_timeout` per attempt,
and returns the first connected socket, which the caller then owns. It raises `NoUpstream` when
every attempt failed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from proxy import log, sockopts
from proxy.config import Address, Upstream


class NoUpstream(Exception):
    """Every server of the upstream failed to connect for this client connection."""


@dataclass(eq=False)
class ServerState:
    addr: Address
    active: int = 0
    fails: int = 0
    down_until: float = 0.0


class Balancer:
    """Pure selection state for one upstream: no I/O, time passed in."""

    def __init__(self, cfg: Upstream) -> None:
        self.cfg = cfg
        self.servers = [ServerState(a) for a in cfg.servers]
        self._by_name = {str(s.addr): s for s in self.servers}
        self._next = 0

    def order(self, now: float) -> list[ServerState]:
        """The servers to try for one new connection, in order, each once."""
        n = len(self.servers)
        start = self._next
        self._next = (self._next + 1) % n
        rotated = [self.servers[(start + i) % n] for i in range(n)]
        if self.cfg.balance == "least_conn":
            rotated.sort(key=lambda s: s.active)  # stable: rotation breaks ties
        healthy = [s for s in rotated if s.down_until <= now]
        cooling = [s for s in rotated if s.down_until > now]
        return healthy + cooling

    def succeeded(self, s: ServerState) -> None:
        s.fails = 0
        s.down_until = 0.0

    def failed(self, s: ServerState, now: float) -> bool:
        """Record a failed connect; True when this failure marks the server down."""
        s.fails += 1
        if s.fails >= self.cfg.max_fails and self.cfg.fail_timeout > 0:
            s.down_until = now + self.cfg.fail_timeout
            s.fails = 0
            return True
        return False

    def state_of(self, name: str) -> ServerState | None:
        """The server whose address is `name` ("host:port", as it travels in a takeover)."""
        return self._by_name.get(name)


async def _resolve(addr: Address) -> tuple[int, tuple[str, int]]:
    try:
        ip = ipaddress.ip_address(addr.host)
    except ValueError:
        infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"{addr.host} does not resolve") from None
        fam, _, _, _, sa = infos[0]
        return int(fam), (str(sa[0]), int(sa[1]))
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return fam, (addr.host, addr.port)


IP_FREEBIND = 15  # linux/in.h
IPV6_FREEBIND = 78  # linux/in6.h
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per destination


def bind_source(sock: socket.socket, cfg: Upstream) -> None:
    """Bind the upstream `source` address (nginx's proxy_bind). A source that moves with a
    host migration binds even while it is not local (IP_FREEBIND). Raises OSError."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if cfg.source_moves:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.bind((cfg.source, 0))


async def connect_one(addr: Address, cfg: Upstream) -> socket.socket:
    """One connect attempt within `connect_timeout`; raises OSError or trio.TooSlowError."""
    fam, sa = await _resolve(addr)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sockopts.apply(sock, cfg.sockopts)
        if cfg.source:
            bind_source(sock, cfg)
        with trio.fail_after(cfg.connect_timeout):
            err = sock.connect_ex(sa)
            if err == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, str(err)))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(
    balancer: Balancer,
    on_failure: Callable[[Address], None],
    clock: Callable[[], float] = trio.current_time,
    order: list[ServerState] | None = None,
) -> tuple[socket.socket, ServerState]:
    """Connect to the first server that answers, in `order` (default: the balancer's next).
    The caller owns the socket; the returned server's `active` was incremented for it."""
    cfg = balancer.cfg
    for s in order if order is not None else balancer.order(clock()):
        try:
            sock = await connect_one(s.addr, cfg)
        except (OSError, trio.TooSlowError) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else (
                errno.errorcode.get(exc.errno or 0, str(exc)))
            on_failure(s.addr)
            down = balancer.failed(s, clock())
            log.warning("upstream_connect_failed", upstream=cfg.name, server=str(s.addr),
                        reason=reason, marked_down=down)
            continue
        balancer.succeeded(s)
        s.active += 1
        return sock, s
    raise NoUpstream(f"no server of upstream {cfg.name} could be reached")
