"""The only TOML reader: the config file parsed once into frozen dataclasses.

Every value is validated at load. Unknown keys are errors. A `ConfigError` names the dotted key
(`upstream.app.servers[1]: ...`) so the CLI can print it as one line and exit 2. Relative paths
are resolved against the config file's directory. Durations are seconds (float); 0 disables a
timeout where the key says so.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_REQUIRED: Any = object()  # the default of a key that must be present


class ConfigError(Exception):
    """An invalid config; `str()` is the one line the CLI prints, starting with the dotted key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive probes: SO_KEEPALIVE with TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT."""

    idle: float = 60.0
    interval: float = 10.0
    count: int = 6


@dataclass(frozen=True)
class SocketOptions:
    """Options applied to every socket on one side of a pair (client side or upstream side)."""

    keepalive: Keepalive | None = Keepalive()
    user_timeout: float = 0.0  # TCP_USER_TIMEOUT; 0 leaves the kernel default
    nodelay: bool = True


@dataclass(frozen=True)
class ProxySection:
    pidfile: Path
    takeover_socket: Path
    drain_timeout: float = 30.0
    upgrade_timeout: float = 30.0
    log_level: str = "info"
    workers: int = 1  # worker processes per generation ("auto" in the file: the CPU count)
    worker_timeout: float = 10.0  # a worker that answers no heartbeat for this long is replaced


@dataclass(frozen=True)
class MetricsSection:
    listen: Address


@dataclass(frozen=True)
class Listener:
    name: str
    listen: Address
    mode: str
    upstream: str
    sockopts: SocketOptions = SocketOptions()
    idle_timeout: float = 3600.0  # close a pair after this long with no byte either way; 0: never
    max_connections: int = 10000
    backlog: int = 1024
    splice: bool = True  # tcp mode: zero-copy os.splice through a pipe per direction
    # http mode
    header_timeout: float = 10.0  # a request head must arrive within this (408; slowloris)
    keepalive_timeout: float = 60.0  # an idle keep-alive client connection is closed after this
    response_timeout: float = 60.0  # request sent -> response head received (504)
    max_header_size: int = 32768  # bytes of request head (431 above)
    access_log: bool = True  # one log line per request
    # after an error answered before the request was read whole (nginx's names; see linger.py)
    lingering_close: str = "on"  # off | on (when more input may come) | always
    lingering_time: float = 30.0  # read and discard the client's input for at most this long...
    lingering_timeout: float = 5.0  # ...and stop once it sends nothing for this long


@dataclass(frozen=True)
class Upstream:
    name: str
    servers: tuple[Address, ...]
    balance: str = "round_robin"
    connect_timeout: float = 3.0
    sockopts: SocketOptions = SocketOptions()
    max_fails: int = 3  # consecutive failed connects before a server is skipped...
    fail_timeout: float = 10.0  # ...for this long (then it is tried again)
    pool_max_idle: int = 32  # http mode: idle keep-alive connections kept per server
    pool_idle_timeout: float = 30.0  # ...each for at most this long
    source: str = ""  # local address for connections to these servers ("": the kernel's choice)
    source_moves: bool = False  # `source` is a [migration] address: bind it even when not local


MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class MigrationSection:
    """`[migration]`: host migration (proxy/migrate.py). `addresses` are "ADDR/PREFIX dev IF"
    strings, parsed by proxy.netaddr.parse_moving (validated here)."""

    listen: Address
    key_file: Path
    key: bytes = field(repr=False)
    addresses: tuple[str, ...]

    @property
    def ips(self) -> frozenset[str]:
        return frozenset(a.split()[0].split("/")[0] for a in self.addresses)


@dataclass(frozen=True)
class Config:
    path: Path
    proxy: ProxySection
    metrics: MetricsSection | None
    listeners: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]
    migration: MigrationSection | None = None

    def moves(self, host: str) -> bool:
        """Whether `host` is one of the `[migration] addresses` (bind it with IP_FREEBIND)."""
        return self.migration is not None and host in self.migration.ips


MODES = ("tcp", "http")
BALANCES = ("round_robin", "least_conn")
LOG_LEVELS = ("debug", "info", "warning", "error")
LINGERING = ("off", "on", "always")


class _Table:
    """A TOML table being read: hands out typed values and rejects the keys never asked for."""

    def __init__(self, key: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(key, f"expected a table, got {_kind(raw)}")
        self.key = key
        self.raw: dict[str, Any] = raw
        self.seen: set[str] = set()

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, conv: Callable[[str, object], T], default: T = _REQUIRED) -> T:
        self.seen.add(name)
        if name not in self.raw:
            if default is _REQUIRED:
                raise ConfigError(self.sub(name), "missing")
            return default
        return conv(self.sub(name), self.raw[name])

    def value(self, name: str, default: object) -> object:
        """The raw value of a sub-table or array key (its own reader validates it)."""
        self.seen.add(name)
        return self.raw.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.raw

    def finish(self) -> None:
        for name in self.raw:
            if name not in self.seen:
                raise ConfigError(self.sub(name), "unknown key")


def _kind(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _str(key: str, v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"expected a non-empty string, got {_kind(v)}")
    return v


def _bool(key: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {_kind(v)}")
    return v


def _seconds(key: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(key, f"expected a duration in seconds, got {_kind(v)}")
    if v < 0 or v != v or v == float("inf"):
        raise ConfigError(key, f"expected a finite duration >= 0, got {v}")
    return float(v)


def _positive_seconds(key: str, v: object) -> float:
    s = _seconds(key, v)
    if s == 0:
        raise ConfigError(key, "must be greater than 0")
    return s


def _count(key: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {_kind(v)}")
    if v < 1:
        raise ConfigError(key, f"expected an integer >= 1, got {v}")
    return v


MAX_WORKERS = 256


def _workers(key: str, v: object) -> int:
    if v == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WORKERS:
        raise ConfigError(key, f'expected an integer from 1 to {MAX_WORKERS}, or "auto"')
    return v


def _choice(options: tuple[str, ...]) -> Callable[[str, object], str]:
    def conv(key: str, v: object) -> str:
        s = _str(key, v)
        if s not in options:
            raise ConfigError(key, f"expected one of {', '.join(options)}, got {s!r}")
        return s

    return conv


def parse_address(key: str, v: object) -> Address:
    """`host:port` or `[v6]:port`; port 0 asks the kernel for a free port (tests use it)."""
    s = _str(key, v)
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
    else:
        host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535 or "[" in host:
        raise ConfigError(key, f"expected host:port, got {s!r}")
    return Address(host, int(port))


def _path(base: Path) -> Callable[[str, object], Path]:
    def conv(key: str, v: object) -> Path:
        p = Path(_str(key, v))
        return p if p.is_absolute() else base / p

    return conv


def _keepalive(key: str, v: object) -> Keepalive | None:
    if v is False:
        return None
    t = _Table(key, v)
    ka = Keepalive(
        idle=t.get("idle", _positive_seconds, Keepalive.idle),
        interval=t.get("interval", _positive_seconds, Keepalive.interval),
        count=t.get("count", _count, Keepalive.count),
    )
    t.finish()
    return ka


def _sockopts(t: _Table) -> SocketOptions:
    default = SocketOptions()
    ka = _keepalive(t.sub("keepalive"), t.value("keepalive", None)) if t.has("keepalive") else (
        default.keepalive)
    return SocketOptions(
        keepalive=ka,
        user_timeout=t.get("user_timeout", _seconds, default.user_timeout),
        nodelay=t.get("nodelay", _bool, default.nodelay),
    )


def _listener(key: str, raw: object) -> Listener:
    t = _Table(key, raw)
    d = Listener
    listener = Listener(
        name=t.get("name", _str),
        listen=t.get("listen", parse_address),
        mode=t.get("mode", _choice(MODES), "tcp"),
        upstream=t.get("upstream", _str),
        sockopts=_sockopts(t),
        idle_timeout=t.get("idle_timeout", _seconds, d.idle_timeout),
        max_connections=t.get("max_connections", _count, d.max_connections),
        backlog=t.get("backlog", _count, d.backlog),
        splice=t.get("splice", _bool, d.splice),
        header_timeout=t.get("header_timeout", _positive_seconds, d.header_timeout),
        keepalive_timeout=t.get("keepalive_timeout", _positive_seconds, d.keepalive_timeout),
        response_timeout=t.get("response_timeout", _positive_seconds, d.response_timeout),
        max_header_size=t.get("max_header_size", _count, d.max_header_size),
        access_log=t.get("access_log", _bool, d.access_log),
        lingering_close=t.get("lingering_close", _choice(LINGERING), d.lingering_close),
        lingering_time=t.get("lingering_time", _positive_seconds, d.lingering_time),
        lingering_timeout=t.get("lingering_timeout", _positive_seconds, d.lingering_timeout),
    )
    t.finish()
    return listener


def _upstream(key: str, name: str, raw: object) -> Upstream:
    t = _Table(key, raw)
    t.seen.add("servers")
    servers_raw = t.raw.get("servers")
    if servers_raw is None:
        raise ConfigError(t.sub("servers"), "missing")
    if not isinstance(servers_raw, list) or not servers_raw:
        raise ConfigError(t.sub("servers"), "expected a non-empty array of host:port")
    servers = tuple(parse_address(f"{t.sub('servers')}[{i}]", s) for i, s in enumerate(servers_raw))
    if len(set(servers)) != len(servers):
        raise ConfigError(t.sub("servers"), "a server is listed twice")
    d = Upstream
    up = Upstream(
        name=name,
        servers=servers,
        balance=t.get("balance", _choice(BALANCES), d.balance),
        connect_timeout=t.get("connect_timeout", _positive_seconds, d.connect_timeout),
        sockopts=_sockopts(t),
        max_fails=t.get("max_fails", _count, d.max_fails),
        fail_timeout=t.get("fail_timeout", _seconds, d.fail_timeout),
        pool_max_idle=t.get("pool_max_idle", _count, d.pool_max_idle),
        pool_idle_timeout=t.get("pool_idle_timeout", _positive_seconds, d.pool_idle_timeout),
        source=t.get("source", _ip, d.source),
    )
    t.finish()
    return up


def _ip(key: str, v: object) -> str:
    s = _str(key, v)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ConfigError(key, f"expected an IP address, got {s!r}") from None


def _moving_address(key: str, v: object) -> str:
    s = _str(key, v)
    parts = s.split()
    try:
        if len(parts) != 3 or parts[1] != "dev":
            raise ValueError
        ipaddress.ip_interface(parts[0])
    except ValueError:
        raise ConfigError(key, f"expected \"ADDR/PREFIX dev IFNAME\", got {s!r}") from None
    return s


def _key(key: str, path: Path) -> bytes:
    """The shared migration key: at least MIN_KEY_BYTES bytes, readable by its owner only."""
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read migration key {path}: {exc.strerror}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(key, f"migration key {path} has mode "
                          f"{stat.S_IMODE(st.st_mode):04o}: must be 0600 (owner only)")
    if len(data) < MIN_KEY_BYTES:
        raise ConfigError(key, f"migration key {path} holds {len(data)} bytes: "
                          f"at least {MIN_KEY_BYTES} needed")
    return data


def _migration(raw: object, base: Path) -> MigrationSection:
    t = _Table("migration", raw)
    key_file = t.get("key_file", _path(base))
    addrs_raw = t.value("addresses", None)
    if not isinstance(addrs_raw, list) or not addrs_raw:
        raise ConfigError(t.sub("addresses"), "expected a non-empty array of \"ADDR/PREFIX dev IF\"")
    addresses = tuple(_moving_address(f"{t.sub('addresses')}[{i}]", a)
                      for i, a in enumerate(addrs_raw))
    m = MigrationSection(listen=t.get("listen", parse_address), key_file=key_file,
                         key=_key(t.sub("key_file"), key_file), addresses=addresses)
    t.finish()
    return m


def parse(raw: dict[str, Any], path: Path) -> Config:
    """Validate a decoded TOML document. Raises ConfigError naming the first bad key."""
    top = _Table("", raw)
    base = path.parent
    t = _Table("proxy", top.value("proxy", {}))
    d = ProxySection
    proxy = ProxySection(
        pidfile=t.get("pidfile", _path(base), base / "proxy.pid"),
        takeover_socket=t.get("takeover_socket", _path(base), base / "proxy.takeover"),
        drain_timeout=t.get("drain_timeout", _seconds, d.drain_timeout),
        upgrade_timeout=t.get("upgrade_timeout", _positive_seconds, d.upgrade_timeout),
        log_level=t.get("log_level", _choice(LOG_LEVELS), d.log_level),
        workers=t.get("workers", _workers, d.workers),
        worker_timeout=t.get("worker_timeout", _positive_seconds, d.worker_timeout),
    )
    t.finish()

    metrics = None
    if top.has("metrics"):
        m = _Table("metrics", top.value("metrics", None))
        metrics = MetricsSection(listen=m.get("listen", parse_address))
        m.finish()

    migration = _migration(top.value("migration", None), base) if top.has("migration") else None
    if migration is not None and proxy.workers > 1:
        # A migration dumps every connection of one process; with workers the supervisor holds
        # none of them (coordinating N workers' dumps is not built).
        raise ConfigError("proxy.workers", "host migration ([migration]) needs workers = 1")

    ups_t = _Table("upstream", top.value("upstream", {}))
    upstreams = {n: _upstream(f"upstream.{n}", n, ups_t.raw[n]) for n in ups_t.raw}
    ups_t.seen.update(upstreams)
    if migration is not None:
        upstreams = {n: replace(u, source_moves=u.source in migration.ips)
                     for n, u in upstreams.items()}

    lst_raw = top.value("listener", [])
    if not isinstance(lst_raw, list) or not lst_raw:
        raise ConfigError("listener", "expected at least one [[listener]] table")
    listeners = tuple(_listener(f"listener[{i}]", r) for i, r in enumerate(lst_raw))
    names: set[str] = set()
    addrs: set[Address] = set()
    if metrics is not None:
        addrs.add(metrics.listen)
    for i, lst in enumerate(listeners):
        if lst.name in names:
            raise ConfigError(f"listener[{i}].name", f"duplicate listener name {lst.name!r}")
        if lst.listen in addrs and lst.listen.port != 0:
            raise ConfigError(f"listener[{i}].listen", f"address {lst.listen} is used twice")
        if lst.upstream not in upstreams:
            raise ConfigError(f"listener[{i}].upstream", f"no [upstream.{lst.upstream}] table")
        names.add(lst.name)
        addrs.add(lst.listen)
    top.finish()
    return Config(path=path, proxy=proxy, metrics=metrics, listeners=listeners, upstreams=upstreams,
                  migration=migration)


def load(path: str | Path) -> Config:
    """Read and validate the config file. Raises ConfigError (the CLI exits 2 on it)."""
    p = Path(path).resolve()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config {p}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: invalid TOML: {exc}") from exc
    return parse(raw, p)


def summary(cfg: Config) -> str:
    """The multi-line summary `proxy check` prints."""
    lines = [f"config {cfg.path}: valid",
             f"  pidfile {cfg.proxy.pidfile}", f"  takeover_socket {cfg.proxy.takeover_socket}",
             f"  workers {cfg.proxy.workers}"]
    if cfg.metrics:
        lines.append(f"  metrics http://{cfg.metrics.listen}/metrics")
    for lst in cfg.listeners:
        lines.append(f"  listener {lst.name} {lst.listen} mode={lst.mode} -> {lst.upstream}")
    for up in cfg.upstreams.values():
        servers = ", ".join(str(s) for s in up.servers)
        lines.append(f"  upstream {up.name} {up.balance}: {servers}"
                     + (f" source={up.source}" if up.source else ""))
    if cfg.migration:
        lines.append(f"  migration listen={cfg.migration.listen} "
                     f"addresses={', '.join(cfg.migration.addresses)}")
    return "\n".join(lines)
