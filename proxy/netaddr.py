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

import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
EEXIST, EADDRNOTAVAIL = 17, 99  # netlink errors that mean "already so" (add / remove)


class AddressError(Exception):
    """An address could not be added or removed (the cause is kept)."""


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

    def __init__(self, addresses: tuple[MovingAddress, ...]) -> None:
        from pyroute2 import IPRoute  # imported here: only a migration needs it

        self.addresses = addresses
        self._ipr: Any = IPRoute()
        self._index: dict[str, int] = {}
        self._arp: dict[str, tuple[socket.socket, bytes]] = {}
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

    def close(self) -> None:
        for ps, _ in self._arp.values():
            ps.close()
        self._arp.clear()
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
