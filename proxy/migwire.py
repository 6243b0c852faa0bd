"""The host-migration channel's wire, sans-IO: mutual authentication with a shared key, then
authenticated frames carrying takeover-session messages and TCP_REPAIR dumps.

No trio and no sockets here (migrate.py is the adapter). Modelled on h11: `receive_data()`,
`next_payload()`, and `seal()` / `output()` for what to write.

Handshake (A = the host giving its connections away, which connects; B = the one taking them)
-----------------------------------------------------------------------------------------
    A -> B   "PXMG" u16 version=1, nonce_a (32 random bytes)                      38 bytes
    B -> A   "PXMG" u16 version=1, nonce_b (32), HMAC(key, "B" nonce_a nonce_b)   70 bytes
    A -> B   HMAC(key, "A" nonce_a nonce_b)                                        32 bytes
Each side checks the other's MAC (constant-time compare) before it sends anything else: a peer
that fails is dropped and nothing changed. The role letter keeps one side's proof from being
reflected as the other's; fresh nonces on both sides keep a recorded proof from being replayed.
Both then derive `session = HMAC(key, "session" nonce_a nonce_b)`.

Frames (after the handshake, both directions)
---------------------------------------------
    offset  size  field
    0       4     length of the payload, u32 big-endian, 1 .. MAX_PAYLOAD
    4       n     payload
    4+n     32    HMAC-SHA256(session, direction letter, seq u64, length u32, payload)
`seq` counts this direction's frames from 0 and is never sent: the receiver uses its own count,
so a replayed, reordered, dropped or reflected frame fails the MAC. Any failure is `WireError`:
the adapter drops the peer.

Payload (the envelope)
----------------------
    kind u8 = 1 (SESSION): u32 length of a takeover frame (frames.py), that frame, then the
                           dumps: u32 count, then each `repair.SocketDump.encode()`
    kind u8 = 2 (REPORT):  a JSON object (B's word that it is live: resumed connections, times)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from proxy.repair import RepairError, SocketDump

MAGIC = b"PXMG"
VERSION = 1
NONCE = 32
MAC = 32
MAX_PAYLOAD = 80 << 20  # a takeover frame's bounds (1 MiB head + 64 MiB body) plus the dumps
MAX_DUMPS = 4096
KIND_SESSION, KIND_REPORT = 1, 2
_HELLO = struct.Struct("!4sH32s")
_LEN = struct.Struct("!I")
_SEQ = struct.Struct("!QI")


class WireError(Exception):
    """The peer failed authentication or sent a malformed, oversized or forged frame."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Payload:
    kind: int
    session: bytes = b""  # KIND_SESSION: one takeover frame
    dumps: tuple[SocketDump, ...] = ()
    report: dict[str, Any] | None = None  # KIND_REPORT


def session_payload(frame: bytes, dumps: tuple[SocketDump, ...] | list[SocketDump] = ()) -> bytes:
    parts = [bytes([KIND_SESSION]), _LEN.pack(len(frame)), frame, _LEN.pack(len(dumps))]
    parts.extend(d.encode() for d in dumps)
    return b"".join(parts)


def report_payload(report: dict[str, Any]) -> bytes:
    return bytes([KIND_REPORT]) + json.dumps(report, separators=(",", ":")).encode()


def parse_payload(data: bytes) -> Payload:
    """Decode one authenticated payload (strict). Raises WireError."""
    if not data:
        raise WireError("empty payload")
    if data[0] == KIND_REPORT:
        try:
            obj = json.loads(data[1:].decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise WireError("report is not JSON") from exc
        if not isinstance(obj, dict):
            raise WireError("report is not an object")
        return Payload(KIND_REPORT, report=obj)
    if data[0] != KIND_SESSION or len(data) < 1 + _LEN.size:
        raise WireError(f"unknown payload kind {data[0]}")
    (flen,) = _LEN.unpack_from(data, 1)
    off = 1 + _LEN.size + flen
    if off + _LEN.size > len(data):
        raise WireError("session payload truncated")
    frame = data[1 + _LEN.size:off]
    (count,) = _LEN.unpack_from(data, off)
    if count > MAX_DUMPS:
        raise WireError(f"{count} socket dumps in one frame (at most {MAX_DUMPS})")
    off += _LEN.size
    view = memoryview(data)
    dumps = []
    try:
        for _ in range(count):
            d, off = SocketDump.decode(view, off)
            dumps.append(d)
    except RepairError as exc:
        raise WireError(str(exc)) from exc
    if off != len(data):
        raise WireError("bytes after the socket dumps")
    return Payload(KIND_SESSION, session=frame, dumps=tuple(dumps))


class Wire:
    """One side of the authenticated channel. `role` is "A" (connects, gives) or "B".

    Use: `output()` after each call for the bytes to write; `receive_data()` with what the
    socket gave; `authenticated` once the handshake passed both ways; then `seal(payload)` to
    send and `next_payload()` to receive (None: more bytes needed). Raises WireError.
    """

    def __init__(self, role: str, key: bytes, nonce: bytes | None = None) -> None:
        if role not in ("A", "B"):
            raise ValueError(role)
        self.role = role
        self.peer = "B" if role == "A" else "A"
        self._key = key
        self._nonce = nonce if nonce is not None else os.urandom(NONCE)
        self._buf = bytearray()
        self._out = bytearray()
        self._session = b""
        self._send_seq = 0
        self._recv_seq = 0
        self.authenticated = False
        self._step = "wait_hello" if role == "B" else "wait_proof_b"
        if role == "A":
            self._out += _HELLO.pack(MAGIC, VERSION, self._nonce)
        self._nonces = b""

    def output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        if not self.authenticated:
            self._handshake()

    def _handshake(self) -> None:
        if self._step == "wait_hello":  # B
            if len(self._buf) < _HELLO.size:
                self._check_magic()
                return
            magic, version, nonce_a = _HELLO.unpack_from(self._buf)
            if magic != MAGIC or version != VERSION:
                raise WireError("not a migration peer (bad magic or version)")
            del self._buf[:_HELLO.size]
            self._nonces = nonce_a + self._nonce
            self._out += _HELLO.pack(MAGIC, VERSION, self._nonce) + _mac(
                self._key, b"B", self._nonces)
            self._step = "wait_proof_a"
        if self._step == "wait_proof_a":  # B
            if len(self._buf) < MAC:
                return
            proof = bytes(self._buf[:MAC])
            del self._buf[:MAC]
            if not hmac.compare_digest(proof, _mac(self._key, b"A", self._nonces)):
                raise WireError("the peer does not hold the migration key")
            self._done()
        elif self._step == "wait_proof_b":  # A
            if len(self._buf) < _HELLO.size + MAC:
                self._check_magic()
                return
            magic, version, nonce_b = _HELLO.unpack_from(self._buf)
            if magic != MAGIC or version != VERSION:
                raise WireError("not a migration peer (bad magic or version)")
            self._nonces = self._nonce + nonce_b
            proof = bytes(self._buf[_HELLO.size:_HELLO.size + MAC])
            del self._buf[:_HELLO.size + MAC]
            if not hmac.compare_digest(proof, _mac(self._key, b"B", self._nonces)):
                raise WireError("the peer does not hold the migration key")
            self._out += _mac(self._key, b"A", self._nonces)
            self._done()

    def _check_magic(self) -> None:
        if self._buf and not MAGIC.startswith(bytes(self._buf[:4])):
            raise WireError("not a migration peer (bad magic)")

    def _done(self) -> None:
        self._session = _mac(self._key, b"session", self._nonces)
        self.authenticated = True
        self._step = "frames"

    def seal(self, payload: bytes) -> bytes:
        """The bytes of one authenticated frame carrying `payload`."""
        if not self.authenticated:
            raise WireError("not authenticated yet")
        if not 0 < len(payload) <= MAX_PAYLOAD:
            raise WireError("payload exceeds the channel's bounds")
        head = _LEN.pack(len(payload))
        tag = _mac(self._session, self.role.encode(), _SEQ.pack(self._send_seq, len(payload)),
                   payload)
        self._send_seq += 1
        return head + payload + tag

    def next_payload(self) -> bytes | None:
        """The next authenticated payload, or None when more bytes are needed."""
        if not self.authenticated or len(self._buf) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if not 0 < n <= MAX_PAYLOAD:
            raise WireError(f"frame length {n} out of bounds")
        end = _LEN.size + n + MAC
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[_LEN.size:_LEN.size + n])
        tag = bytes(self._buf[_LEN.size + n:end])
        want = _mac(self._session, self.peer.encode(), _SEQ.pack(self._recv_seq, n), payload)
        if not hmac.compare_digest(tag, want):
            raise WireError("frame authentication failed (forged, replayed or reordered)")
        del self._buf[:end]
        self._recv_seq += 1
        return payload
