"""Sans-IO codec of the takeover channel: bytes and fds in, messages out (and back).

No I/O here and no trio: `upgrade.py` feeds what `fdpass.py` received and writes what `send()`
returns. Modelled on h11: `receive_data()`, `receive_fds()`, `next_message()`, `send()`.

Wire format (version 1)
-----------------------
Every message is one frame on the Unix stream socket:

    offset  size  field
    0       4     magic   b"PXTK"
    4       2     version u16 big-endian (1)
    6       2     type    u16 (MsgType)
    8       2     nfds    u16: fds that travel with this frame (SCM_RIGHTS on its first byte)
    10      4     hlen    u32: length of the JSON head, 2 .. MAX_HEAD
    14      4     blen    u32: length of the binary body, 0 .. MAX_BODY
    18      hlen  head    UTF-8 JSON object, fields per type (below)
    18+hlen blen  body    raw bytes the head refers to by [offset, length]

Bounds: nfds <= MAX_FDS (253, the kernel's SCM_MAX_FD), head <= 1 MiB, body <= 64 MiB. Anything
else (bad magic or version, unknown type, a head that is not a JSON object, a frame complete
without its fds, a field of the wrong type) is a `ProtocolError`: the adapter drops that peer,
closes every fd it received from it, and the serving generation carries on.

Fds are attached to the first byte of their frame, so by the time a whole frame has been read its
fds have been received too; `receive_fds` queues them and each frame takes its `nfds` in order.

Messages, in protocol order (old = serving generation, new = the one taking over):
    HELLO     new -> old  {pid}
    WELCOME   old -> new  {pid, generation, signalled_at}
    LISTENERS old -> new  {listeners: [{name, addr}]}                fds: one per listener
    READY     new -> old  {}   (new holds every listener; it accepts from RELEASED on)
    CONNS     old -> new  {conns: [ConnRecord]}    fds: per conn, client [+ upstream]
    ACK       new -> old  {ids: [int]}  (new owns these now; old closes its copies)
    RELEASED  old -> new  {metrics}  (old stopped accepting: new is the serving generation
                                      and starts accepting)
    DONE      old -> new  {metrics}  (old holds nothing more; metrics = what it counted since
                                      RELEASED)
    ABORT     either      {reason}
A ConnRecord: {id, listener, mode, client, server, c2u: Dir, u2c: Dir} with
Dir = {pending: [offset, length] into body, eof: bool, shut: bool}. Its fds follow the previous
record's: mode "tcp" and "tunnel" (an http Upgrade turned relay) have two, client then
upstream; mode "http" (an idle keep-alive client) has one, and its c2u.pending holds the bytes
h11 had read but not processed (pipelined requests), c2u.eof whether the client sent EOF.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from proxy.forward import DirectionSnapshot, PairSnapshot

MAGIC = b"PXTK"
VERSION = 1
HEADER = struct.Struct("!4sHHHII")
MAX_FDS = 253
MAX_HEAD = 1 << 20
MAX_BODY = 64 << 20
FDS_PER_MODE = {"tcp": 2, "tunnel": 2, "http": 1}  # client [, upstream]


class ProtocolError(Exception):
    """The peer sent something this codec will not accept; drop the peer."""


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


@dataclass
class Message:
    type: MsgType
    head: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    fds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ConnRecord:
    id: int
    listener: str
    mode: str
    client: str
    server: str
    state: PairSnapshot


NEED_DATA = None


class Codec:
    """One side of a takeover channel: framing, bounds and strict decoding."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def receive_fds(self, fds: list[int]) -> None:
        self._fds.extend(fds)

    def leftover_fds(self) -> list[int]:
        """Fds received but not claimed by a complete frame (the adapter closes them)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    def next_message(self) -> Message | None:
        """A complete message, or NEED_DATA (None). Raises ProtocolError."""
        if len(self._buf) < HEADER.size:
            if self._buf and not MAGIC.startswith(bytes(self._buf[:4])):
                raise ProtocolError("bad magic")
            return NEED_DATA
        magic, version, mtype, nfds, hlen, blen = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError("bad magic")
        if version != VERSION:
            raise ProtocolError(f"unsupported version {version}")
        try:
            typ = MsgType(mtype)
        except ValueError:
            raise ProtocolError(f"unknown message type {mtype}") from None
        if nfds > MAX_FDS or not 2 <= hlen <= MAX_HEAD or blen > MAX_BODY:
            raise ProtocolError(f"frame out of bounds (nfds={nfds} hlen={hlen} blen={blen})")
        end = HEADER.size + hlen + blen
        if len(self._buf) < end:
            return NEED_DATA
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame without its fds ({len(self._fds)} of {nfds})")
        raw_head = bytes(self._buf[HEADER.size:HEADER.size + hlen])
        body = bytes(self._buf[HEADER.size + hlen:end])
        del self._buf[:end]
        fds = [self._fds.popleft() for _ in range(nfds)]
        try:
            head = json.loads(raw_head.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            for fd in fds:
                self._fds.appendleft(fd)  # left for leftover_fds() so the adapter closes them
            raise ProtocolError("head is not JSON") from exc
        if not isinstance(head, dict):
            self._fds.extendleft(fds)
            raise ProtocolError("head is not a JSON object")
        return Message(typ, head, body, fds)

    @staticmethod
    def send(msg: Message) -> bytes:
        """The frame for `msg`; the adapter sends `msg.fds` with its first byte."""
        head = json.dumps(msg.head, separators=(",", ":")).encode()
        if len(msg.fds) > MAX_FDS or len(head) > MAX_HEAD or len(msg.body) > MAX_BODY:
            raise ValueError("message exceeds the channel's bounds")
        hdr = HEADER.pack(MAGIC, VERSION, msg.type, len(msg.fds), len(head), len(msg.body))
        return hdr + head + msg.body


# ---- typed fields -------------------------------------------------------------------------------

def field_of(msg: Message, name: str, kind: type | tuple[type, ...]) -> Any:
    """`msg.head[name]`, checked to be of `kind` (bool is never accepted as an int)."""
    v = msg.head.get(name)
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in _kinds(kind)):
        raise ProtocolError(f"{msg.type.name}.{name}: missing or of the wrong type")
    return v


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def conns_message(records: list[ConnRecord], fds: list[int]) -> Message:
    """A CONNS message: the records' pending bytes packed into the body."""
    body = bytearray()
    out = []
    for r in records:
        entry: dict[str, Any] = {"id": r.id, "listener": r.listener, "mode": r.mode,
                                 "client": r.client, "server": r.server}
        for name, d in (("c2u", r.state.c2u), ("u2c", r.state.u2c)):
            entry[name] = {"pending": [len(body), len(d.pending)], "eof": d.eof, "shut": d.shut}
            body += d.pending
        out.append(entry)
    return Message(MsgType.CONNS, {"conns": out}, bytes(body), fds)


def parse_conns(msg: Message) -> list[tuple[ConnRecord, list[int]]]:
    """The records of a CONNS message, each with its fds. Strict."""
    conns = field_of(msg, "conns", list)
    modes = [c.get("mode") if isinstance(c, dict) else None for c in conns]
    if not all(m in FDS_PER_MODE for m in modes):
        raise ProtocolError("CONNS: unknown connection mode")
    if sum(FDS_PER_MODE[str(m)] for m in modes) != len(msg.fds):
        raise ProtocolError("CONNS: wrong number of fds for these connections")
    out = []
    cursor = 0
    for c in conns:
        if not isinstance(c, dict):
            raise ProtocolError("CONNS: a record is not an object")
        sub = Message(msg.type, c)
        dirs = []
        for name in ("c2u", "u2c"):
            d = field_of(sub, name, dict)
            dm = Message(msg.type, d)
            span = field_of(dm, "pending", list)
            if (len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                          and x >= 0 for x in span)
                    or span[0] + span[1] > len(msg.body)):
                raise ProtocolError(f"CONNS.{name}.pending: bad span")
            dirs.append(DirectionSnapshot(msg.body[span[0]:span[0] + span[1]],
                                          field_of(dm, "eof", bool), field_of(dm, "shut", bool)))
        rec = ConnRecord(id=field_of(sub, "id", int), listener=field_of(sub, "listener", str),
                         mode=field_of(sub, "mode", str), client=field_of(sub, "client", str),
                         server=field_of(sub, "server", str), state=PairSnapshot(*dirs))
        n = FDS_PER_MODE[rec.mode]
        out.append((rec, msg.fds[cursor:cursor + n]))
        cursor += n
    return out
