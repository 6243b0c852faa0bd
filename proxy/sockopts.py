"""Applying a side's `SocketOptions` to a connected TCP socket (keepalive, user timeout, nodelay)."""

from __future__ import annotations

import socket

from proxy.config import SocketOptions


def apply(sock: socket.socket, opts: SocketOptions) -> None:
    """Set TCP_NODELAY, SO_KEEPALIVE (+ TCP_KEEPIDLE/INTVL/CNT) and TCP_USER_TIMEOUT on `sock`.

    Keepalive times are whole seconds for the kernel; sub-second values round up to 1.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(opts.nodelay))
    ka = opts.keepalive
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(ka is not None))
    if ka is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(ka.idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(ka.interval)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka.count)
    if opts.user_timeout > 0:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(opts.user_timeout * 1000))
