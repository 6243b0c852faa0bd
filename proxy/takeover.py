"""The takeover protocol's one home, sans-IO: typed events, their wire form, and the `Session`
state machine each side runs (old = the serving generation, new = the one taking over).

No trio and no sockets here (importing this module must not import trio): the adapters
(`channel.py`, driven by `upgrade.py` on the old side and `adopt.py` on the new side) feed bytes
and fds in and send what `Session.send()` returns. Modelled on h11's `_state.py`: everything
that affects a transition lives in `TRANSITIONS` and `SENDER` below, and anything else raises
`ProtocolError` (the peer's fault: drop it) or `LocalProtocolError` (ours: nothing was sent).

Theory of operation
-------------------
    new                                   old (serving)
    HELLO {pid, release, protocols}  -->                 new offers a range of protocol versions
                                     <--  WELCOME {pid, generation, protocol, ...}  old picks one
                                          (or ABORT: no common version)
                                     <--  LISTENERS {keys}  + one fd per listening socket
    READY {}                         -->                 new holds every listener, does not accept
                                          old stops accepting
                                     <--  RELEASED {metrics, upgrade_pending}
                                          new accepts from here on: it is the serving generation
                                     <--  CONNS {conns} + fds    } a batch at a time, at most
    ACK {ids}                        -->                         } `window` un-ACKed; ACKs in order
                                     <--  DONE {metrics}          old holds nothing more; exits
    ABORT {reason}                  <-->  either side, in any state before DONE

Why connections move only after RELEASED (protocol 2): until then the only things the new
generation holds are copies of listening sockets, so any failure before RELEASED (a crash, a
kill -9, a SIGSTOP past the timeout, a bad frame, an ABORT) changes nothing: the old generation
resumes accepting and no client notices. From RELEASED on, the new generation serves; each
connection batch is a two-phase transfer: the old side pauses the pairs and sends copies of
their fds with a snapshot (prepare), keeps every pair resumable until its ACK (commit), and
resumes the un-ACKed ones itself on ABORT or any failure. The new side ACKs a batch *before* it
starts those handlers, so an un-ACKed pair was never touched by it. (Cloudflare's ecdysis
handover is the nearest production anchor: Request -> Item -> Prepared -> Commit/Abort.)

Versions: protocol 1 is the previous release's (no `protocols` in HELLO, no `protocol` in
WELCOME; CONNS may also come between READY and RELEASED). Protocol 2 moves connections only after
RELEASED. Protocol 3 adds the record mode "http_exchange": an http connection paused mid-request
(see the end of this module). Protocol 4: the generation session carries no connections; they
move worker to worker over the channels LISTENERS announces (`__worker__@<path>` keys;
supervisor.py, localworker.py). This release speaks 1 to 4, so it can take over from the
previous release and hand over to the next one.

Message fields (JSON head; `body` holds the pending bytes the records point into):
    HELLO     {pid, version: release string, protocols: [lo, hi]}
    WELCOME   {pid, generation, signalled_at, started_at, version: release, protocol}
    LISTENERS {listeners: [key]}                      fds: one per key
    READY     {}
    CONNS     {conns: [ConnRecord]}                   fds: per record, client [+ upstream]
    ACK       {ids: [int]}
    RELEASED  {metrics, upgrade_pending: bool}
    DONE      {metrics}
    ABORT     {reason, serving: bool}  (does the sender serve afterwards)
A ConnRecord: {id, listener, mode, client, server, c2u: Dir, u2c: Dir} with
Dir = {pending: [offset, length] into body, eof: bool, shut: bool}. Mode "tcp" and "tunnel" (an
http Upgrade turned relay) carry two fds, client then upstream; "http" (an idle keep-alive
client) one, its c2u.pending the bytes read but not processed (pipelined requests);
"http_exchange" (protocol 3) two, client then upstream, and an `exchange` object (below).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from proxy.frames import (
    MAX_FDS,
    Frame,
    Framer,
    LocalProtocolError,
    OwnedFds,
    ProtocolError,
    encode,
)
from proxy.framing import FramingSnapshot, Kind, Phase, snapshot_problem
from proxy.movable import DirectionSnapshot, ExchangeState, PairSnapshot

__all__ = ["MAX_FDS", "LocalProtocolError", "OwnedFds", "ProtocolError"]

PROTOCOLS = (1, 4)  # the protocol versions this release speaks (lo, hi)
ACK_WINDOW = 4  # CONNS batches the old side may send ahead of their ACK
# client [, upstream]; "accepted" (host migration only): a client connection taken from the
# listen backlog at the freeze, not handled yet (the receiving proxy handles it as a new one)
FDS_PER_MODE = {"tcp": 2, "tunnel": 2, "http": 1, "http_exchange": 2, "accepted": 1}
EXCHANGE_SINCE = 3  # the protocol version that moves http exchanges mid-body
WORKERS_SINCE = 4  # connections move over the worker channels in LISTENERS (localworker.py)
MAX_REASON = 500


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    LISTENERS = 3
    READY = 4
    CONNS = 5
    ACK = 6
    RELEASED = 7
    DONE = 8
    ABORT = 9


# ---- events --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    pid: int
    release: str
    protocols: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Welcome:
    pid: int
    generation: int
    signalled_at: float
    started_at: float
    release: str
    protocol: int = 1


@dataclass(frozen=True)
class Listeners:
    keys: tuple[str, ...]  # fds: one per key, in order


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class ConnRecord:
    id: int
    listener: str
    mode: str
    client: str
    server: str
    state: PairSnapshot
    exchange: ExchangeState | None = None  # mode "http_exchange" only

    @property
    def nfds(self) -> int:
        return FDS_PER_MODE[self.mode]


@dataclass(frozen=True)
class Conns:
    records: tuple[ConnRecord, ...]  # fds: each record's `nfds`, in order


@dataclass(frozen=True)
class Ack:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Released:
    metrics: dict[str, list[Any]]  # a Metrics.snapshot(); Metrics.restore() validates its rows
    upgrade_pending: bool = False  # a SIGUSR2 was queued: the new generation upgrades at once


@dataclass(frozen=True)
class Done:
    metrics: dict[str, list[Any]]  # what the old side counted since RELEASED


@dataclass(frozen=True)
class Abort:
    reason: str
    # Whether the sender serves after this ABORT. It settles the one crossing the stream order
    # cannot: the new side gives up (serving=False, it exits) while RELEASED is on its way.
    serving: bool = False


Event = Hello | Welcome | Listeners | Ready | Conns | Ack | Released | Done | Abort

TYPE_OF: dict[type, MsgType] = {
    Hello: MsgType.HELLO, Welcome: MsgType.WELCOME, Listeners: MsgType.LISTENERS,
    Ready: MsgType.READY, Conns: MsgType.CONNS, Ack: MsgType.ACK, Released: MsgType.RELEASED,
    Done: MsgType.DONE, Abort: MsgType.ABORT,
}


# ---- the state machine -----------------------------------------------------------------------

class Role(Enum):
    OLD = "old"
    NEW = "new"


class State(Enum):
    IDLE = "idle"  # nothing said yet
    GREETING = "greeting"  # HELLO said, WELCOME not yet
    WELCOMED = "welcomed"  # version agreed; LISTENERS next
    LISTENING = "listening"  # listeners handed over; READY next
    READY = "ready"  # the new side holds the listeners; RELEASED next
    RELEASED = "released"  # the new side serves; connections move; DONE next
    DONE = "done"  # the old side holds nothing more
    ABORTED = "aborted"  # either side gave up: the old side keeps (or resumes) everything un-ACKed


# Who may send each message.
SENDER: dict[MsgType, frozenset[Role]] = {
    MsgType.HELLO: frozenset({Role.NEW}),
    MsgType.WELCOME: frozenset({Role.OLD}),
    MsgType.LISTENERS: frozenset({Role.OLD}),
    MsgType.READY: frozenset({Role.NEW}),
    MsgType.CONNS: frozenset({Role.OLD}),
    MsgType.ACK: frozenset({Role.NEW}),
    MsgType.RELEASED: frozenset({Role.OLD}),
    MsgType.DONE: frozenset({Role.OLD}),
    MsgType.ABORT: frozenset({Role.OLD, Role.NEW}),
}

# (state, message) -> next state, the same for both roles (a message moves both sides alike).
# Every pair not listed is a protocol error. ABORT is allowed from every state but DONE and
# ABORTED (added below).
TRANSITIONS: dict[tuple[State, MsgType], State] = {
    (State.IDLE, MsgType.HELLO): State.GREETING,
    (State.GREETING, MsgType.WELCOME): State.WELCOMED,
    (State.WELCOMED, MsgType.LISTENERS): State.LISTENING,
    (State.LISTENING, MsgType.READY): State.READY,
    (State.READY, MsgType.RELEASED): State.RELEASED,
    (State.RELEASED, MsgType.CONNS): State.RELEASED,
    (State.RELEASED, MsgType.ACK): State.RELEASED,
    (State.RELEASED, MsgType.DONE): State.DONE,
    **{(s, MsgType.ABORT): State.ABORTED for s in State if s not in (State.DONE, State.ABORTED)},
}
# Protocol 1 (the previous release) also moved connections between READY and RELEASED.
TRANSITIONS_V1: dict[tuple[State, MsgType], State] = {
    (State.READY, MsgType.CONNS): State.READY,
    (State.READY, MsgType.ACK): State.READY,
}


def negotiate(ours: tuple[int, int], theirs: tuple[int, int]) -> int | None:
    """The highest protocol version both ranges hold, or None."""
    hi = min(ours[1], theirs[1])
    return hi if hi >= max(ours[0], theirs[0]) else None


class Session:
    """One side of one takeover session: the transition table and the ACK window.

    `send(event, fds)` checks the event is legal now, updates the state and returns the bytes
    to write (the adapter attaches `fds`, which the sender keeps owning). `receive_data()` /
    `receive_fds()` take what the socket gave; `next_event()` returns `(event, OwnedFds)` or None
    (more bytes needed) and raises ProtocolError on anything illegal. `close()` closes every
    received fd no event took.
    """

    def __init__(self, role: Role, protocols: tuple[int, int] = PROTOCOLS,
                 window: int = ACK_WINDOW, carries_fds: bool = True) -> None:
        self.role = role
        # False: a transport with no fds (host migration, migrate.py: each connection travels
        # as TCP_REPAIR dumps beside its record, and that adapter checks their count).
        self.carries_fds = carries_fds
        self.protocols = protocols
        self.window = window
        self.state = State.IDLE
        self.version: int | None = None  # agreed at WELCOME
        self.peer_protocols: tuple[int, int] | None = None  # what HELLO offered (old side)
        self.abort_reason = ""
        self._unacked: collections.deque[tuple[int, ...]] = collections.deque()
        self._in_flight: set[int] = set()
        self._framer = Framer()

    # ---- queries -------------------------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """CONNS batches sent (old) or received (new) and not ACKed yet."""
        return len(self._unacked)

    def can_send_conns(self) -> bool:
        return self._legal(MsgType.CONNS) and len(self._unacked) < self.window

    def oldest_unacked(self) -> tuple[int, ...]:
        return self._unacked[0] if self._unacked else ()

    # ---- sending ---------------------------------------------------------------------------

    def send(self, event: Event, fds: Sequence[int] = ()) -> bytes:
        mtype = TYPE_OF[type(event)]
        if self.role not in SENDER[mtype]:
            raise LocalProtocolError(f"{self.role.value} side may not send {mtype.name}")
        self._check(event, LocalProtocolError, len(fds))
        frame = _encode(event, len(fds))
        self._advance(event, LocalProtocolError)
        return frame

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def receive_fds(self, fds: list[int]) -> None:
        self._framer.receive_fds(fds)

    def next_event(self) -> tuple[Event, OwnedFds] | None:
        frame = self._framer.next_frame()
        if frame is None:
            return None
        try:
            try:
                mtype = MsgType(frame.type)
            except ValueError:
                raise ProtocolError(f"unknown message type {frame.type}") from None
            peer = Role.NEW if self.role is Role.OLD else Role.OLD
            if peer not in SENDER[mtype]:
                raise ProtocolError(f"{mtype.name} from the {peer.value} side")
            event = _decode(mtype, frame)
            self._check(event, ProtocolError, len(frame.fds))
            self._advance(event, ProtocolError)
        except BaseException:
            frame.fds.close()
            raise
        return event, frame.fds

    def close(self) -> None:
        self._framer.close()

    # ---- the table -------------------------------------------------------------------------

    def _legal(self, mtype: MsgType) -> bool:
        return (self.state, mtype) in TRANSITIONS or (
            self.version == 1 and (self.state, mtype) in TRANSITIONS_V1)

    def _check(self, event: Event, error: type[ProtocolError], nfds: int) -> None:
        mtype = TYPE_OF[type(event)]
        if not self._legal(mtype):
            raise error(f"{mtype.name} not allowed in state {self.state.value}")
        if isinstance(event, Listeners) and self.carries_fds and nfds != len(event.keys):
            raise error("LISTENERS: one fd per listener")
        if isinstance(event, Conns):
            if any(r.mode == "http_exchange" for r in event.records) and (
                    self.version or 1) < EXCHANGE_SINCE:
                raise error(f"http exchanges move from protocol {EXCHANGE_SINCE} on")
            if len(self._unacked) >= self.window:
                raise error(f"CONNS beyond the ACK window of {self.window}")
            ids = [r.id for r in event.records]
            if not ids or len(set(ids)) != len(ids) or self._in_flight.intersection(ids):
                raise error("CONNS: ids empty, repeated or already in flight")
            if self.carries_fds and sum(r.nfds for r in event.records) != nfds:
                raise error("CONNS: wrong number of fds for these connections")
        if isinstance(event, Ack) and (
                not self._unacked or sorted(event.ids) != sorted(self._unacked[0])):
            raise error("ACK does not match the oldest batch in flight")
        if isinstance(event, Released | Done) and self._unacked:
            raise error(f"{mtype.name} with {len(self._unacked)} batches not ACKed")
        if isinstance(event, Welcome):
            self._check_welcome(event, error)

    def _check_welcome(self, event: Welcome, error: type[ProtocolError]) -> None:
        if self.role is Role.OLD:
            if self.version is None or event.protocol != self.version:
                raise error("WELCOME must carry the negotiated protocol")
        elif not self.protocols[0] <= event.protocol <= self.protocols[1]:
            raise error(f"WELCOME picked protocol {event.protocol}, outside our "
                        f"{self.protocols[0]}..{self.protocols[1]}")

    def _advance(self, event: Event, error: type[ProtocolError]) -> None:
        mtype = TYPE_OF[type(event)]
        nxt = TRANSITIONS.get((self.state, mtype)) or TRANSITIONS_V1[(self.state, mtype)]
        if isinstance(event, Hello) and self.role is Role.OLD:
            self.peer_protocols = event.protocols
            self.version = negotiate(self.protocols, event.protocols)
        elif isinstance(event, Welcome):
            self.version = event.protocol
        elif isinstance(event, Conns):
            ids = tuple(r.id for r in event.records)
            self._unacked.append(ids)
            self._in_flight.update(ids)
        elif isinstance(event, Ack):
            self._in_flight.difference_update(self._unacked.popleft())
        elif isinstance(event, Abort):
            self.abort_reason = event.reason
        self.state = nxt


# ---- wire form -------------------------------------------------------------------------------

def _encode(event: Event, nfds: int) -> bytes:
    mtype = TYPE_OF[type(event)]
    body = b""
    head: dict[str, Any]
    if isinstance(event, Hello):
        head = {"pid": event.pid, "version": event.release, "protocols": list(event.protocols)}
    elif isinstance(event, Welcome):
        head = {"pid": event.pid, "generation": event.generation,
                "signalled_at": event.signalled_at, "started_at": event.started_at,
                "version": event.release, "protocol": event.protocol}
    elif isinstance(event, Listeners):
        head = {"listeners": list(event.keys)}
    elif isinstance(event, Conns):
        head, body = _encode_conns(event.records)
    elif isinstance(event, Ack):
        head = {"ids": list(event.ids)}
    elif isinstance(event, Released):
        head = {"metrics": event.metrics, "upgrade_pending": event.upgrade_pending}
    elif isinstance(event, Done):
        head = {"metrics": event.metrics}
    elif isinstance(event, Abort):
        head = {"reason": event.reason[:MAX_REASON], "serving": event.serving}
    else:
        head = {}
    return encode(mtype, head, body, nfds)


def _encode_conns(records: Sequence[ConnRecord]) -> tuple[dict[str, Any], bytes]:
    body = bytearray()
    out = []
    for r in records:
        entry: dict[str, Any] = {"id": r.id, "listener": r.listener, "mode": r.mode,
                                 "client": r.client, "server": r.server}
        for name, d in (("c2u", r.state.c2u), ("u2c", r.state.u2c)):
            entry[name] = {"pending": [len(body), len(d.pending)], "eof": d.eof, "shut": d.shut}
            body += d.pending
        if r.exchange is not None:
            entry["exchange"] = _encode_exchange(r.exchange, body)
        out.append(entry)
    return {"conns": out}, bytes(body)


class _Head:
    """Typed, strict access to one JSON object of a message (bool is never an int)."""

    def __init__(self, what: str, obj: object) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what}: not an object")
        self.what, self.obj = what, obj

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.obj and default is not ...:
            return default
        v = self.obj.get(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise ProtocolError(f"{self.what}.{name}: missing or of the wrong type")
        if isinstance(v, float) and not math.isfinite(v):
            raise ProtocolError(f"{self.what}.{name}: not a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1 << 53:
            raise ProtocolError(f"{self.what}.{name}: number out of range")
        return v

    def pid(self, name: str) -> int:
        v = int(self.get(name, int))
        if v <= 0:  # 0 or -1 would signal a process group or everything we may signal
            raise ProtocolError(f"{self.what}.{name}: not a pid")
        return v

    def ints(self, name: str, default: Any = ...) -> tuple[int, ...]:
        v = self.get(name, list, default)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ProtocolError(f"{self.what}.{name}: not a list of integers")
        return tuple(v)


def _decode(mtype: MsgType, frame: Frame) -> Event:
    h = _Head(mtype.name, frame.head)
    if mtype is MsgType.HELLO:
        lo_hi = h.ints("protocols", (1, 1))  # protocol 1 did not say: it spoke 1
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ProtocolError("HELLO.protocols: not a range [lo, hi]")
        return Hello(h.pid("pid"), h.get("version", str, ""), (lo_hi[0], lo_hi[1]))
    if mtype is MsgType.WELCOME:
        signalled = float(h.get("signalled_at", (int, float)))
        return Welcome(h.pid("pid"), h.get("generation", int), signalled,
                       float(h.get("started_at", (int, float), signalled)),
                       h.get("version", str, ""), h.get("protocol", int, 1))
    if mtype is MsgType.LISTENERS:
        keys = h.get("listeners", list)
        if not all(isinstance(k, str) for k in keys):
            raise ProtocolError("LISTENERS.listeners: not a list of strings")
        return Listeners(tuple(keys))
    if mtype is MsgType.READY:
        return Ready()
    if mtype is MsgType.CONNS:
        return Conns(_decode_conns(h, frame.body))
    if mtype is MsgType.ACK:
        return Ack(h.ints("ids"))
    if mtype is MsgType.RELEASED:
        return Released(_metrics(h), h.get("upgrade_pending", bool, False))
    if mtype is MsgType.DONE:
        return Done(_metrics(h))
    return Abort(str(h.get("reason", str, ""))[:MAX_REASON], h.get("serving", bool, False))


def _metrics(h: _Head) -> dict[str, list[Any]]:
    m = h.get("metrics", dict, {})
    if not all(isinstance(k, str) and isinstance(v, list) for k, v in m.items()):
        raise ProtocolError(f"{h.what}.metrics: not {{name: [rows]}}")
    return dict(m)


def _decode_conns(h: _Head, body: bytes) -> tuple[ConnRecord, ...]:
    out = []
    for c in h.get("conns", list):
        rec = _Head("CONNS.conns[]", c)
        mode = rec.get("mode", str)
        if mode not in FDS_PER_MODE:
            raise ProtocolError(f"CONNS: unknown connection mode {mode[:20]!r}")
        dirs = []
        for name in ("c2u", "u2c"):
            d = _Head(f"CONNS.{name}", rec.get(name, dict))
            span = d.ints("pending")
            if len(span) != 2 or min(span) < 0 or span[0] + span[1] > len(body):
                raise ProtocolError(f"CONNS.{name}.pending: bad span")
            dirs.append(DirectionSnapshot(body[span[0]:span[0] + span[1]],
                                          d.get("eof", bool), d.get("shut", bool)))
        exchange = None
        if mode == "http_exchange":
            exchange = _decode_exchange(_Head("CONNS.exchange", rec.get("exchange", dict)), body)
            if exchange.phase == "request_body" and dirs[1].pending:
                raise ProtocolError("CONNS.exchange: response bytes before the response")
        out.append(ConnRecord(id=rec.get("id", int), listener=rec.get("listener", str),
                              mode=mode, client=rec.get("client", str),
                              server=rec.get("server", str), state=PairSnapshot(*dirs),
                              exchange=exchange))
    return tuple(out)


# ---- an http exchange in flight (protocol 3) ---------------------------------------------------
# {phase, method, target, version, headers: [[name, value]], up_headers, request: Framing,
#  response: Framing | null, status, client_keep, resp_keep, server, elapsed,
#  after: [offset, length], up_after: [offset, length]}; byte strings of heads as latin-1
# text (h11 validated them: no CR, LF or NUL), the bytes past a body as spans of the body.
# Framing = {kind, phase, left, digits, pending, field, trailer_length, trailer_te, consumed,
#  payload, max_line} (framing.FramingSnapshot; decoded strictly: snapshot_problem()).
EXCHANGE_PHASES = ("request_body", "response_head", "response_body")


def _latin(b: bytes) -> str:
    return b.decode("latin-1")


def _span(data: bytes, body: bytearray) -> list[int]:
    out = [len(body), len(data)]
    body += data
    return out


def _encode_framing(f: FramingSnapshot) -> dict[str, Any]:
    return {"kind": f.kind.value, "phase": f.phase.value, "left": f.left, "digits": f.digits,
            "pending": f.pending, "field": _latin(f.field),
            "trailer_length": None if f.trailer_length is None else _latin(f.trailer_length),
            "trailer_te": f.trailer_te, "consumed": f.consumed, "payload": f.payload,
            "max_line": f.max_line}


def _encode_exchange(x: ExchangeState, body: bytearray) -> dict[str, Any]:
    return {"phase": x.phase, "method": _latin(x.method), "target": _latin(x.target),
            "version": _latin(x.version),
            "headers": [[_latin(k), _latin(v)] for k, v in x.headers],
            "up_headers": [[_latin(k), _latin(v)] for k, v in x.up_headers],
            "request": _encode_framing(x.request),
            "response": None if x.response is None else _encode_framing(x.response),
            "status": x.status, "client_keep": x.client_keep, "resp_keep": x.resp_keep,
            "server": x.server, "elapsed": x.elapsed,
            "after": _span(x.after, body), "up_after": _span(x.up_after, body),
            "rechunk": x.rechunk}


def _bytes_of(h: _Head, name: str) -> bytes:
    try:
        return str(h.get(name, str)).encode("latin-1")
    except UnicodeEncodeError:
        raise ProtocolError(f"{h.what}.{name}: not latin-1") from None


def _pairs_of(h: _Head, name: str) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for pair in h.get(name, list):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise ProtocolError(f"{h.what}.{name}: not [[name, value]]")
        try:
            out.append((pair[0].encode("latin-1"), pair[1].encode("latin-1")))
        except UnicodeEncodeError:
            raise ProtocolError(f"{h.what}.{name}: not latin-1") from None
    return tuple(out)


def _decode_framing(h: _Head) -> FramingSnapshot:
    try:
        kind, phase = Kind(h.get("kind", str)), Phase(h.get("phase", str))
    except ValueError:
        raise ProtocolError(f"{h.what}: unknown framing kind or phase") from None
    tl = h.get("trailer_length", (str, type(None)))
    snap = FramingSnapshot(
        kind=kind, phase=phase, left=h.get("left", int), digits=h.get("digits", int),
        pending=h.get("pending", int), field=_bytes_of(h, "field"),
        trailer_length=None if tl is None else tl.encode("latin-1", "replace"),
        trailer_te=h.get("trailer_te", bool), consumed=h.get("consumed", int),
        payload=h.get("payload", int), max_line=h.get("max_line", int))
    problem = snapshot_problem(snap)
    if problem:
        raise ProtocolError(f"{h.what}: {problem}")
    return snap


def _body_span(h: _Head, name: str, body: bytes) -> bytes:
    span = h.ints(name)
    if len(span) != 2 or min(span) < 0 or span[0] + span[1] > len(body):
        raise ProtocolError(f"{h.what}.{name}: bad span")
    return body[span[0]:span[0] + span[1]]


def _decode_exchange(h: _Head, body: bytes) -> ExchangeState:
    phase = h.get("phase", str)
    if phase not in EXCHANGE_PHASES:
        raise ProtocolError(f"{h.what}.phase: {phase[:20]!r}")
    response = h.get("response", (dict, type(None)))
    x = ExchangeState(
        phase=phase, method=_bytes_of(h, "method"), target=_bytes_of(h, "target"),
        version=_bytes_of(h, "version"), headers=_pairs_of(h, "headers"),
        up_headers=_pairs_of(h, "up_headers"),
        request=_decode_framing(_Head(f"{h.what}.request", h.get("request", dict))),
        response=None if response is None else _decode_framing(
            _Head(f"{h.what}.response", response)),
        status=h.get("status", int), client_keep=h.get("client_keep", bool),
        resp_keep=h.get("resp_keep", bool), server=h.get("server", str),
        elapsed=float(h.get("elapsed", (int, float))),
        after=_body_span(h, "after", body), up_after=_body_span(h, "up_after", body),
        rechunk=h.get("rechunk", bool, False))
    problem = _exchange_problem(x)
    if problem:
        raise ProtocolError(f"{h.what}: {problem}")
    return x


def _exchange_problem(x: ExchangeState) -> str | None:
    """Why `x` cannot be an exchange a generation paused, or None (peer data: strict)."""
    if (x.phase == "response_body") != (x.response is not None):
        return "a response framing exactly in response_body"
    request_done = x.request.phase is Phase.DONE
    if x.phase != "request_body" and not request_done:
        return f"{x.phase} with the request body unfinished"
    if x.after and not request_done:
        return "bytes past an unfinished request body"
    if x.up_after and x.phase != "response_body":
        return "upstream bytes past a response not being sent"
    if x.rechunk and (x.response is None or x.response.kind is not Kind.EOF):
        return "re-chunking a body that is not until-EOF"
    if x.phase == "response_body" and not 100 <= x.status <= 999:
        return "no valid status for the response being sent"
    fields = [x.method, x.target, x.version, *(b for pair in x.headers for b in pair),
              *(b for pair in x.up_headers for b in pair)]
    if any(c in f for f in fields for c in (b"\r", b"\n", b"\0")):
        return "CR, LF or NUL in a replayed head"
    if x.version not in (b"1.0", b"1.1") or (x.client_keep and x.version != b"1.1"):
        return "bad HTTP version or keep-alive"
    return None
