"""The moving addresses: add and remove them through netlink (pyroute2), announce them with a
gratuitous ARP.

`Addresses` is opened before a migration's freeze (a netlink socket costs ~170 ms to set up with
pyroute2, and a packet socket bound with a protocol 23-28 ms, an RCU grace period): during the
freeze each add or remove is one netlink round trip (well under a millisecond, where spawning
`ip` costs 5-10 ms), and an ARP announcement is one sendto on a packet socket already bound.
No trio here: each call is a short synchronous system call.

Fd ownership: `Addresses` owns its netlink socket and one packet socket per interface, all
closed by `close()`.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
EEXIST, EADDRNOTAVAIL = 17, 99  # netlink errors that mean "already so" (add / remove)
SO_ATTACH_FILTER = 26  # asm-generic/socket.h
SO_RCVBUFFORCE = 33
PACKET_HOST = 0  # linux/if_packet.h
CAPTURE_BUFFER = 64 << 20  # what the kernel may queue for the replay during one freeze
MAX_REPLAY = 200_000  # frames replayed at most


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program (linux/filter.h); replacing one is atomic."""
    arr = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # (arr alive: a local)


DROP_ALL = [(0x06, 0, 0, 0)]  # ret #0


def match_ipv4_dst(ips: list[str]) -> list[tuple[int, int, int, int]]:
    """cBPF: frames addressed to this host (pkttype HOST), IPv4, destination in `ips`."""
    n = len(ips)
    prog = [(0x20, 0, 0, 0xFFFFF004),  # ld [SKF_AD_OFF + SKF_AD_PKTTYPE]
            (0x15, 0, 3 + n, PACKET_HOST),  # jeq HOST, else drop
            (0x28, 0, 0, 12),  # ldh [12]: ethertype
            (0x15, 0, 1 + n, ETH_P_IP),  # jeq IPv4, else drop
            (0x20, 0, 0, 30)]  # ld [30]: IPv4 destination
    for i, ip in enumerate(ips):
        prog.append((0x15, n - i, 0, int(ipaddress.IPv4Address(ip))))  # jeq -> accept
    prog += [(0x06, 0, 0, 0), (0x06, 0, 0, 0x40000)]  # drop; accept (the whole frame)
    return prog


class AddressError(Exception):
    """An address could not be added or removed (the cause is kept)."""


def _csum(data: bytes) -> bytes:
    """The Internet checksum of `data`, as the two bytes to store (native-order sum: the
    one's-complement sum does not depend on byte order when stored back the same way)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("=H", ~total & 0xFFFF)


def fix_checksums(frame: bytes) -> bytes:
    """An Ethernet/IPv4 frame with its IP header and TCP checksums recomputed. A frame taken
    from a packet socket may carry a partial checksum (checksum offload: the sender's kernel
    left it to the NIC, veth never fills it in); re-sent as is, the receiver drops it."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    if ihl < 20 or len(frame) < 14 + total or total < ihl:
        return frame
    ip = bytearray(frame[14:14 + total])
    ip[10:12] = b"\0\0"
    ip[10:12] = _csum(bytes(ip[:ihl]))
    if ip[9] == socket.IPPROTO_TCP and total - ihl >= 20:
        seg = bytearray(ip[ihl:])
        seg[16:18] = b"\0\0"
        pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(seg))
        seg[16:18] = _csum(pseudo + bytes(seg))
        ip[ihl:] = seg
    return frame[:14] + bytes(ip)


@dataclass(frozen=True)
class MovingAddress:
    """One `[migration] addresses` entry: "10.77.0.100/32 dev eth0"."""

    ip: str
    prefixlen: int
    dev: str

    def __str__(self) -> str:
        return f"{self.ip}/{self.prefixlen} dev {self.dev}"

    @property
    def key(self) -> str:
        """What both peers compare: the address and prefix (the device name is each host's)."""
        return f"{self.ip}/{self.prefixlen}"


def parse_moving(text: str) -> MovingAddress:
    """Parse "ADDR/PREFIX dev IFNAME". Raises ValueError with what is wrong."""
    parts = text.split()
    if len(parts) != 3 or parts[1] != "dev" or not parts[2]:
        raise ValueError(f"expected \"ADDR/PREFIX dev IFNAME\", got {text!r}")
    net = ipaddress.ip_interface(parts[0] if "/" in parts[0] else parts[0] + "/32")
    return MovingAddress(str(net.ip), net.network.prefixlen, parts[2])


def garp_frame(mac: bytes, ip: str) -> bytes:
    """A gratuitous ARP request for `ip` from `mac`: sender and target protocol address are
    both `ip`, so every neighbour updates its cache entry for it."""
    ipb = ipaddress.IPv4Address(ip).packed
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, ARP_REQUEST) + mac + ipb + b"\0" * 6 + ipb
    return eth + arp


class Addresses:
    """Netlink and packet sockets for a set of moving addresses, opened in advance."""

    def __init__(self, addresses: tuple[MovingAddress, ...], capture: bool = False) -> None:
        """`capture`: also open, per interface, a packet socket for the replay (bound now,
        with a filter that drops everything until `start_capture()`)."""
        from pyroute2 import IPRoute  # imported here: only a migration needs it

        self.addresses = addresses
        self._ipr: Any = IPRoute()
        self._index: dict[str, int] = {}
        self._arp: dict[str, tuple[socket.socket, bytes]] = {}
        self._cap: dict[str, socket.socket] = {}
        try:
            for a in addresses:
                if a.dev not in self._index:
                    found = self._ipr.link_lookup(ifname=a.dev)
                    if not found:
                        raise AddressError(f"no interface {a.dev!r} for {a}")
                    self._index[a.dev] = int(found[0])
                if ":" not in a.ip and a.dev not in self._arp:
                    ps = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
                    try:
                        ps.bind((a.dev, ETH_P_ARP))
                        mac = ps.getsockname()[4]
                    except BaseException:
                        ps.close()
                        raise
                    self._arp[a.dev] = (ps, bytes(mac))
                if capture and ":" not in a.ip and a.dev not in self._cap:
                    cs = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
                    self._cap[a.dev] = cs
                    _attach(cs, DROP_ALL)
                    cs.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
                    cs.bind((a.dev, ETH_P_IP))
                    cs.setblocking(False)
        except BaseException:
            self.close()
            raise

    def local(self) -> set[str]:
        """The moving addresses (`key`s) that are on this host now."""
        out = set()
        for a in self.addresses:
            for msg in self._ipr.get_addr(index=self._index[a.dev]):
                if msg.get("IFA_ADDRESS") == a.ip and msg.get("prefixlen") == a.prefixlen:
                    out.add(a.key)
        return out

    def add(self) -> None:
        """Add every moving address (one already there is fine). Raises AddressError."""
        for a in self.addresses:
            self._change("add", a, EEXIST)

    def remove(self) -> None:
        """Remove every moving address (one already gone is fine). Raises AddressError."""
        for a in self.addresses:
            self._change("del", a, EADDRNOTAVAIL)

    def _change(self, cmd: str, a: MovingAddress, benign: int) -> None:
        try:
            self._ipr.addr(cmd, index=self._index[a.dev], address=a.ip, prefixlen=a.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) == benign:
                return
            raise AddressError(f"{cmd} {a}: {exc}") from exc

    def announce(self) -> int:
        """A gratuitous ARP for every IPv4 moving address; returns how many went out. A
        failure to send is not fatal (neighbours then learn it at their next ARP)."""
        sent = 0
        for a in self.addresses:
            entry = self._arp.get(a.dev)
            if entry is None:
                continue
            ps, mac = entry
            with contextlib.suppress(OSError):
                ps.send(garp_frame(mac, a.ip))
                sent += 1
        return sent

    def macs(self) -> dict[str, str]:
        """{moving IPv4 address: this host's MAC on its interface, hex}: where A replays."""
        return {a.ip: self._arp[a.dev][1].hex() for a in self.addresses if a.dev in self._arp}

    def start_capture(self) -> None:
        """From now on queue every frame that arrives for a moving IPv4 address."""
        ips = [a.ip for a in self.addresses if ":" not in a.ip]
        for cs in self._cap.values():
            _attach(cs, match_ipv4_dst(ips))

    def stop_capture(self) -> None:
        for cs in self._cap.values():
            cs.close()
        self._cap.clear()

    def replay(self, macs: dict[str, str]) -> int:
        """Re-send what was captured to the peer that now holds the addresses (`macs`: its
        `macs()`), rewriting the Ethernet addresses; then stop capturing. Returns the count."""
        sent = 0
        for dev, cs in self._cap.items():
            own = self._arp[dev][1] if dev in self._arp else b"\0" * 6
            while sent < MAX_REPLAY:
                try:
                    frame = cs.recv(65536)
                except BlockingIOError:
                    break
                dst = macs.get(socket.inet_ntoa(frame[30:34])) if len(frame) >= 34 else None
                if dst is None or len(dst) != 12:
                    continue
                with contextlib.suppress(OSError):
                    cs.send(fix_checksums(bytes.fromhex(dst) + own + frame[12:]))
                    sent += 1
        self.stop_capture()
        return sent

    def close(self) -> None:
        self.stop_capture()
        for ps, _ in self._arp.values():
            ps.close()
        self._arp.clear()
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
