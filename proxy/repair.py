"""TCP_REPAIR dump and restore of one established TCP socket, as plain records in and out.

No trio here: `dump()` and `restore()` are a few dozen system calls each (0.1-0.2 ms), done
synchronously in the migration's freeze. The order of every call follows what was found to work
(../shared/reference/tcp-repair-migration-notes.md; CRIU's soccr.c is the reference):

dump (the socket is already in repair mode, `enter_repair()`; its addresses already removed so
nothing arrives meanwhile): TCP_INFO (must be ESTABLISHED: options, window-scale nibbles),
SIOCOUTQ / SIOCOUTQNSD / SIOCINQ, TCP_MAXSEG (mss_clamp in repair mode), TCP_TIMESTAMP,
TCP_REPAIR_WINDOW (exactly 20 bytes), buffer sizes; then per queue TCP_REPAIR_QUEUE +
TCP_QUEUE_SEQ + recv(MSG_PEEK).

restore: socket, TCP_REPAIR=1, IP_TRANSPARENT=1 (IP_FREEBIND is not enough: connect() fails
with ENETUNREACH), SO_SNDBUFFORCE / SO_RCVBUFFORCE, bind(local), TCP_QUEUE_SEQ per queue (the
dumped sequence minus the queue's length), connect(peer) (no SYN in repair mode),
TCP_REPAIR_OPTIONS, TCP_TIMESTAMP (never backwards: the peer's PAWS check would drop every
segment), the receive queue and only the *sent* part of the send queue, TCP_REPAIR_WINDOW (after
the queues: it is checked against rcv_nxt), TCP_REPAIR_QUEUE=NO_QUEUE. `leave_repair()` later
(once the address is local): TCP_REPAIR=0 (the kernel sends a window probe), IP_TRANSPARENT=0,
then the never-sent bytes with a plain send().

Not carried (the kernel has no repair interface for them): congestion state, the out-of-order
queue, ECN state, plain socket options (the caller re-applies its own). Sockets not ESTABLISHED
(half-closed, closing) are refused with `RepairError`; the migration finishes those first.

Fd ownership: `dump()` never closes its socket (the caller closes it, still in repair mode, so
nothing goes on the wire). `restore()` returns a socket the caller owns (in repair mode,
blocking), and closes it itself on any error.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

# ---- constants Python's socket module lacks (values from linux/tcp.h, linux/sockios.h,
# asm-generic/socket.h, linux/in.h) ----------------------------------------------------------
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
SIOCINQ = 0x541B  # FIONREAD
SIOCOUTQ = 0x5411  # TIOCOUTQ
SIOCOUTQNSD = 0x894B  # send queue bytes not sent yet
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_TRANSPARENT = 19
IP_FREEBIND = 15
IPV6_TRANSPARENT = 75

_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window: snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
_OPT = struct.Struct("=II")  # struct tcp_repair_opt: opt_code opt_val
MAX_QUEUE = 64 << 20  # bound on either queue in a decoded dump (the kernel's buffers are smaller)

# Wire form of a SocketDump (encode/decode): a fixed part then the variable bytes.
#   family u8, local: 16-byte address + u16 port, peer: the same, seqs u32 x2 (snd, rcv),
#   unsent u32, options u8, snd_wscale u8, rcv_wscale u8, mss u32, timestamp u32,
#   window 20 bytes, sndbuf u32, rcvbuf u32, len(send queue) u32, len(recv queue) u32,
#   then the send queue bytes and the recv queue bytes.
_FIXED = struct.Struct("!B16sH16sHIIIBBBII20sIIII")


class RepairError(Exception):
    """A socket cannot be dumped or restored (its state, a refused option, a bad record)."""


@dataclass(frozen=True)
class SocketDump:
    """One TCP socket's kernel state, enough to recreate it elsewhere with no packet sent."""

    family: int  # socket.AF_INET or AF_INET6
    local: tuple[str, int]
    peer: tuple[str, int]
    snd_seq: int  # write_seq: the sequence after the last byte of the send queue
    rcv_seq: int  # rcv_nxt: the sequence after the last byte of the receive queue
    send_queue: bytes  # sent-but-unacknowledged bytes followed by never-sent ones
    unsent: int  # how many of send_queue's last bytes were never sent (SIOCOUTQNSD)
    recv_queue: bytes  # received, not read by the application
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    mss: int
    timestamp: int
    window: bytes  # TCP_REPAIR_WINDOW, exactly 20 bytes
    sndbuf: int
    rcvbuf: int

    @property
    def sent(self) -> bytes:
        return self.send_queue[:len(self.send_queue) - self.unsent]

    @property
    def never_sent(self) -> bytes:
        return self.send_queue[len(self.send_queue) - self.unsent:]

    def encode(self) -> bytes:
        return _FIXED.pack(
            4 if self.family == socket.AF_INET else 6, _ip_bytes(self.local[0]), self.local[1],
            _ip_bytes(self.peer[0]), self.peer[1], self.snd_seq, self.rcv_seq, self.unsent,
            self.options, self.snd_wscale, self.rcv_wscale, self.mss, self.timestamp,
            self.window, self.sndbuf, self.rcvbuf, len(self.send_queue),
            len(self.recv_queue)) + self.send_queue + self.recv_queue

    @classmethod
    def decode(cls, data: bytes | memoryview, offset: int = 0) -> tuple[SocketDump, int]:
        """One dump from `data` at `offset`; returns it and the offset after it. Strict: raises
        RepairError on anything a real dump cannot be (the peer's data is checked)."""
        if len(data) - offset < _FIXED.size:
            raise RepairError("socket dump truncated")
        (fam, lip, lport, pip, pport, snd, rcv, unsent, opts, sws, rws, mss, ts, window,
         sndbuf, rcvbuf, slen, rlen) = _FIXED.unpack_from(data, offset)
        if fam not in (4, 6) or slen > MAX_QUEUE or rlen > MAX_QUEUE or unsent > slen:
            raise RepairError("socket dump out of bounds")
        if sws > 14 or rws > 14 or not 0 < mss < 65536 or opts > 0xFF:
            raise RepairError("socket dump: bad options")
        start = offset + _FIXED.size
        end = start + slen + rlen
        if end > len(data):
            raise RepairError("socket dump truncated")
        raw = bytes(data[start:end])
        dump = cls(socket.AF_INET if fam == 4 else socket.AF_INET6,
                   (_ip_str(lip, fam), lport), (_ip_str(pip, fam), pport), snd, rcv,
                   raw[:slen], unsent, raw[slen:], opts, sws, rws, mss, ts, bytes(window),
                   sndbuf, rcvbuf)
        return dump, end


def _ip_bytes(host: str) -> bytes:
    return ipaddress.ip_address(host).packed.rjust(16, b"\0")


def _ip_str(raw: bytes, fam: int) -> str:
    return str(ipaddress.ip_address(raw[12:] if fam == 4 else raw))


def _ioctl_int(sock: socket.socket, req: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), req, buf)
    return int(buf[0])


def _get_u32(sock: socket.socket, opt: int) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, opt, 4)
    return int(struct.unpack("=I", raw)[0])


def _set_u32(sock: socket.socket, opt: int, value: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, opt, struct.pack("=I", value & 0xFFFFFFFF))


def enter_repair(sock: socket.socket) -> None:
    """TCP_REPAIR=1: from now on the socket sends nothing on its own, and close() is silent."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)


def _peek_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    seq = _get_u32(sock, TCP_QUEUE_SEQ)
    data = b""
    if length:
        data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != length:
            raise RepairError(f"queue {queue}: peeked {len(data)} of {length} bytes")
    return seq, data


def dump(sock: socket.socket) -> SocketDump:
    """The state of `sock`, which must be in repair mode and ESTABLISHED. Raises RepairError
    (or OSError from the kernel). Leaves the socket open and in repair mode."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    state, options, wscales = info[0], info[5], info[6]
    if state != TCP_ESTABLISHED:
        raise RepairError(f"socket not established (tcp state {state})")
    outq = _ioctl_int(sock, SIOCOUTQ)
    unsent = _ioctl_int(sock, SIOCOUTQNSD)
    inq = _ioctl_int(sock, SIOCINQ)
    mss = _get_u32(sock, socket.TCP_MAXSEG)
    ts = _get_u32(sock, TCP_TIMESTAMP)
    window = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)
    if len(window) != _WINDOW.size:
        raise RepairError("TCP_REPAIR_WINDOW: unexpected size")
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    try:
        rcv_seq, recv_queue = _peek_queue(sock, TCP_RECV_QUEUE, inq)
        snd_seq, send_queue = _peek_queue(sock, TCP_SEND_QUEUE, outq)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    local = sock.getsockname()
    peer = sock.getpeername()
    return SocketDump(sock.family, (local[0], local[1]), (peer[0], peer[1]), snd_seq, rcv_seq,
                      send_queue, min(unsent, outq), recv_queue, options, wscales & 0x0F,
                      wscales >> 4, mss, ts, window, sndbuf, rcvbuf)


def _fill_queue(sock: socket.socket, queue: int, data: bytes) -> None:
    """Write `data` into a queue in repair mode, in chunks that halve on ENOMEM (CRIU does the
    same: the kernel refuses one skb bigger than it can allocate)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            n = sock.send(view[:chunk])
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > 1024:
                chunk //= 2
                continue
            raise
        view = view[n:]


def restore(d: SocketDump) -> socket.socket:
    """A new socket in `d`'s state, still in repair mode (nothing sent yet; `leave_repair()`
    makes it live). The caller owns it; on error it is closed here and RepairError/OSError
    raised."""
    sock = socket.socket(d.family, socket.SOCK_STREAM)
    try:
        enter_repair(sock)
        if d.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        # (No SO_REUSEADDR: it would replace the SK_FORCE_REUSE that TCP_REPAIR set, which is
        # what lets this bind coexist with our own listener on the same address and port.)
        if d.send_queue or d.recv_queue:
            # The queued bytes must fit: the default 16 KB send buffer does not hold what A had
            # sent unacknowledged. (Only then: forcing a size locks it, which ends the kernel's
            # buffer autotuning for this socket, and costs two calls per socket in the freeze.)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE,
                            max(d.sndbuf, 4 * len(d.send_queue)))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE,
                            max(d.rcvbuf, 4 * len(d.recv_queue)))
        sock.bind(d.local)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _set_u32(sock, TCP_QUEUE_SEQ, d.rcv_seq - len(d.recv_queue))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _set_u32(sock, TCP_QUEUE_SEQ, d.snd_seq - len(d.send_queue))
        sock.connect(d.peer)
        opts = []
        if d.options & TCPI_OPT_SACK:
            opts.append(_OPT.pack(TCPOPT_SACK_PERM, 0))
        if d.options & TCPI_OPT_WSCALE:
            opts.append(_OPT.pack(TCPOPT_WINDOW, d.snd_wscale + (d.rcv_wscale << 16)))
        if d.options & TCPI_OPT_TIMESTAMPS:
            opts.append(_OPT.pack(TCPOPT_TIMESTAMP, 0))
        opts.append(_OPT.pack(TCPOPT_MAXSEG, d.mss))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(opts))
        if d.options & TCPI_OPT_TIMESTAMPS:
            _set_u32(sock, TCP_TIMESTAMP, d.timestamp)
        if d.recv_queue:
            _fill_queue(sock, TCP_RECV_QUEUE, d.recv_queue)
        if d.sent:
            _fill_queue(sock, TCP_SEND_QUEUE, d.sent)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, d.window)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    except BaseException:
        sock.close()  # still in repair mode: nothing goes on the wire
        raise
    return sock


def leave_repair(sock: socket.socket, never_sent: bytes = b"") -> None:
    """Make a restored (or paused) socket live: TCP_REPAIR=0 (the kernel sends a window probe,
    the peer's ACK resynchronises), IP_TRANSPARENT=0, then send the bytes that were never sent
    (they fit: the send buffer was sized for the whole dumped queue). Raises OSError."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
    with contextlib.suppress(OSError):  # (a socket that never had it: A's own, on a rollback)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 0)
    view = memoryview(never_sent)
    while view:
        try:
            n = sock.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError as exc:
            raise RepairError(f"{len(view)} never-sent bytes do not fit the send buffer") from exc
        view = view[n:]
