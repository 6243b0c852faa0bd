"""Host migration, the receiving side ("B"): restore a peer's connections with TCP_REPAIR, take
the moving addresses, go live. `migrate.py` owns the listeners, the control socket and the
giving side; its module docstring is the theory of operation (steps 2, 4 and 5 are B's here).

Fd ownership: each restored socket goes to `Server.adopt()` at once (which owns it from then on:
`drop_adopted()` closes unstarted ones on a failure, still in repair mode, so nothing goes on
the wire); the `Addresses` (netlink, ARP) are closed here whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import trio

from proxy import __version__, log, repair, sockopts
from proxy.config import Config, SocketOptions
from proxy.faults import fault_point
from proxy.gcpause import GcPause
from proxy.metrics import Metrics
from proxy.migchannel import (
    MOVABLE_WAIT,
    POOL_CLOSE_WAIT,
    STEP_TIMEOUT,
    MigChannel,
    MigrationError,
    PeerAborted,
)
from proxy.netaddr import AddressError, Addresses, parse_moving
from proxy.server import Server
from proxy.takeover import PROTOCOLS, Ack, Conns, Done, Hello, Listeners, Ready, Released, Welcome

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


def missing_caps() -> list[str]:
    """The capabilities a migration needs and this process lacks (effective set)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    eff = 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            eff = int(line.split()[1], 16)
    return [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW))
            if not eff >> bit & 1]


async def take(cfg: Config, srv: Server, metrics: Metrics, ch: MigChannel, peer: str) -> None:
    """B's side of one migration, after the wire's handshake: restore what the peer sends, in
    repair mode, ACK each batch; at DONE take the addresses, announce them, go live, report.
    Raises MigrationError (after closing what it restored: nothing went on the wire)."""
    m = cfg.migration
    assert m is not None
    await ch.send(Hello(os.getpid(), __version__, PROTOCOLS))
    welcome, _ = await ch.receive()
    if not isinstance(welcome, Welcome):
        raise MigrationError("expected WELCOME")
    event, _ = await ch.receive()
    if not isinstance(event, Listeners):
        raise MigrationError("expected the moving addresses")
    moving = tuple(parse_moving(a) for a in m.addresses)
    if set(event.keys) != {a.key for a in moving}:
        reason = (f"moving addresses differ: the peer moves {sorted(event.keys)}, "
                  f"ours are {sorted(a.key for a in moving)}")
        await ch.abort(reason)
        raise MigrationError(reason)
    caps = missing_caps()
    if caps:
        reason = f"the receiving proxy lacks {' and '.join(caps)}"
        await ch.abort(reason)
        raise MigrationError(reason)
    try:
        addrs = Addresses(moving)
    except (AddressError, OSError) as exc:
        await ch.abort(f"cannot open netlink/ARP sockets: {exc}")
        raise MigrationError(str(exc)) from exc
    restored: list[tuple[socket.socket, repair.SocketDump, SocketOptions | None]] = []
    gcp = GcPause()  # paused from RELEASED to live: a collection there stalls every client
    local_ids: list[int] = []
    try:
        await ch.send(Ready())
        log.info("migration_phase", phase="incoming", peer=peer, old_pid=welcome.pid)
        # A waits for its connections to become movable (and its pool to close) first.
        event, _ = await ch.receive(MOVABLE_WAIT + 3 * POOL_CLOSE_WAIT + STEP_TIMEOUT)
        if not isinstance(event, Released):
            raise MigrationError(f"expected RELEASED, got {type(event).__name__}")
        t0 = time.monotonic()
        gcp.pause()
        while True:
            event, dumps = await ch.receive()
            if isinstance(event, Done):
                break
            if not isinstance(event, Conns):
                raise MigrationError(f"unexpected {type(event).__name__}")
            if sum(r.nfds for r in event.records) != len(dumps):
                raise MigrationError("CONNS: wrong number of socket dumps")
            i = 0
            for rec in event.records:
                mine = dumps[i:i + rec.nfds]
                i += rec.nfds
                socks: list[socket.socket] = []
                try:
                    for d in mine:
                        socks.append(repair.restore(d))
                    cid = srv.adopt(rec, [s.fileno() for s in socks])  # (closes on error)
                except (repair.RepairError, OSError, ValueError) as exc:
                    for s in socks:
                        s.close()  # (still in repair mode: silent; adopt may have closed it)
                    raise MigrationError(f"restore failed: {exc}") from exc
                local_ids.append(cid)
                restored.extend(zip(socks, mine, _opts(cfg, rec.listener),
                                    strict=False))
            await fault_point("migrate_in", "before_ack")
            await ch.send(Ack(tuple(r.id for r in event.records)))
        restore_ms = (time.monotonic() - t0) * 1000
    except BaseException as exc:
        gcp.resume()
        with trio.CancelScope(shield=True):
            if not isinstance(exc, PeerAborted):
                await ch.abort(str(exc) or type(exc).__name__)
            for s, _, _ in restored:
                s.detach()  # owned by the adopted handlers, closed (in repair mode) there
            srv.drop_adopted()
            addrs.close()
        raise
    # Committed: the connections are ours. Addresses, ARP, repair off, resume.
    try:
        addrs.add()
        arps = addrs.announce()
        macs = addrs.macs()
    finally:
        addrs.close()
    lost = 0
    for s, d, opts in restored:
        try:
            repair.leave_repair(s, d.never_sent)
            if opts is not None:
                sockopts.apply(s, opts)
        except (OSError, repair.RepairError) as exc:
            lost += 1
            log.error("migration_resume_socket_failed", reason=str(exc))
        s.detach()
    srv.start(local_ids)
    freeze_ms = round((time.monotonic() - t0) * 1000, 1)
    gcp.resume(freeze=True)  # (what we adopted lives long: out of the young generations)
    metrics.migrations.labels("success").inc()
    metrics.migrated_connections.labels().inc(len(local_ids))
    log.info("migration_phase", phase="live", peer=peer, resumed=len(local_ids),
             restore_ms=round(restore_ms, 1), freeze_ms=freeze_ms, arp=arps, lost=lost)
    with contextlib.suppress(OSError, trio.TooSlowError):
        await ch.send_report({"resumed": len(local_ids), "freeze_ms": freeze_ms,
                              "restore_ms": round(restore_ms, 1), "macs": macs})


def _opts(cfg: Config, listener: str) -> tuple[SocketOptions | None, SocketOptions | None]:
    """Plain socket options are not carried by repair: ours for a record's client and upstream
    sockets, in fd order (None: the listener is gone, leave the kernel's)."""
    lst = next((x for x in cfg.listeners if x.name == listener), None)
    if lst is None:
        return None, None
    ups = cfg.upstreams.get(lst.upstream)
    return lst.sockopts, ups.sockopts if ups is not None else None
