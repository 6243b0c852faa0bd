"""The takeover channel's framing, sans-IO: bytes and fds in, whole frames out (and back).

No trio and no sockets here. The channel adapter (`channel.py`) feeds what `fdpass.py` received
into a `Framer` and writes what `encode()` returns; `takeover.py` turns frames into typed
events. Modelled on h11: `receive_data()`, `receive_fds()`, `next_frame()`.

Frame format (version 1; the session protocol on top has its own version, see takeover.py)
------------------------------------------------------------------------------------------
Every message is one frame on the Unix stream socket:

    offset  size  field
    0       4     magic   b"PXTK"
    4       2     version u16 big-endian: the frame format, always 1
    6       2     type    u16: the message type (takeover.MsgType)
    8       2     nfds    u16: fds that travel with this frame (SCM_RIGHTS on its first byte)
    10      4     hlen    u32: length of the JSON head, 2 .. MAX_HEAD
    14      4     blen    u32: length of the binary body, 0 .. MAX_BODY
    18      hlen  head    UTF-8 JSON object, fields per message type (takeover.py)
    18+hlen blen  body    raw bytes the head refers to by [offset, length]

Bounds: nfds <= MAX_FDS (253, the kernel's SCM_MAX_FD), head <= 1 MiB, body <= 64 MiB. Anything
else (bad magic or version, out-of-range sizes, a head that is not a JSON object, a frame
complete without its fds) is a `ProtocolError`: the adapter drops that peer and closes every fd
it received from it; the serving generation carries on.

Fd ownership: fds ride on the first byte of their frame, so when a whole frame has been read its
fds have been received too. The `Framer` owns every fd it was given until a frame takes them;
a frame's `OwnedFds` owns them until a consumer `claim()`s them; `close()` on either closes
whatever is still unclaimed. So an error anywhere between recvmsg and the fd's new owner (a
socket object, a relay) closes it exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"PXTK"
FRAME_VERSION = 1
HEADER = struct.Struct("!4sHHHII")
MAX_FDS = 253
MAX_HEAD = 1 << 20
MAX_BODY = 64 << 20


class ProtocolError(Exception):
    """The peer broke the protocol (a bad frame, an unexpected or malformed message): the
    adapter drops the peer. The serving generation is never affected."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol ourselves (a bug): nothing was sent."""


class OwnedFds:
    """Fds received with a frame. Owned here until `claim()`ed; `close()` closes the rest.

    Usable as a context manager: leaving the block closes what was not claimed, so a consumer
    that fails half-way leaks nothing.
    """

    def __init__(self, fds: list[int] | None = None) -> None:
        self._fds: deque[int] = deque(fds or ())

    def __len__(self) -> int:
        return len(self._fds)

    def peek(self) -> list[int]:
        """The unclaimed fds, still owned here (for a sender's SCM_RIGHTS copies)."""
        return list(self._fds)

    def claim(self, n: int | None = None) -> list[int]:
        """Take the next `n` fds (all when None): the caller owns them now."""
        n = len(self._fds) if n is None else n
        if n > len(self._fds):
            raise ProtocolError(f"{n} fds wanted, {len(self._fds)} left")
        return [self._fds.popleft() for _ in range(n)]

    def close(self) -> None:
        while self._fds:
            # (OSError: already closed by a consumer that claimed without saying so)
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Frame:
    type: int
    head: dict[str, Any]
    body: bytes = b""
    fds: OwnedFds = field(default_factory=OwnedFds)


def encode(mtype: int, head: dict[str, Any], body: bytes = b"", nfds: int = 0) -> bytes:
    """The bytes of one frame; its `nfds` fds are sent with the first byte by the adapter."""
    raw = json.dumps(head, separators=(",", ":")).encode()
    if nfds > MAX_FDS or len(raw) > MAX_HEAD or len(body) > MAX_BODY:
        raise LocalProtocolError("message exceeds the channel's bounds")
    return HEADER.pack(MAGIC, FRAME_VERSION, mtype, nfds, len(raw), len(body)) + raw + body


class Framer:
    """One side's receive buffer: framing, bounds and fd bookkeeping."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds = OwnedFds()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def receive_fds(self, fds: list[int]) -> None:
        self._fds._fds.extend(fds)

    def close(self) -> None:
        """Close every fd received and not yet handed to a frame."""
        self._fds.close()

    def next_frame(self) -> Frame | None:
        """A complete frame, or None when more bytes are needed. Raises ProtocolError (the
        fds of a frame that fails to decode stay here for `close()`)."""
        if len(self._buf) < HEADER.size:
            if self._buf and not MAGIC.startswith(bytes(self._buf[:4])):
                raise ProtocolError("bad magic")
            return None
        magic, version, mtype, nfds, hlen, blen = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError("bad magic")
        if version != FRAME_VERSION:
            raise ProtocolError(f"unsupported frame version {version}")
        if nfds > MAX_FDS or not 2 <= hlen <= MAX_HEAD or blen > MAX_BODY:
            raise ProtocolError(f"frame out of bounds (nfds={nfds} hlen={hlen} blen={blen})")
        end = HEADER.size + hlen + blen
        if len(self._buf) < end:
            return None
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame without its fds ({len(self._fds)} of {nfds})")
        try:
            head = json.loads(bytes(self._buf[HEADER.size:HEADER.size + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError("head is not JSON (or nested too deep)") from exc
        if not isinstance(head, dict):
            raise ProtocolError("head is not a JSON object")
        body = bytes(self._buf[HEADER.size + hlen:end])
        del self._buf[:end]
        return Frame(mtype, head, body, OwnedFds(self._fds.claim(nfds)))
