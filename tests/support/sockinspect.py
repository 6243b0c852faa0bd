"""Look at another process's sockets: pidfd_getfd(2) dups them into ours for getsockopt.

Needs Linux >= 5.6 and ptrace permission over the target (root, or our own child with
yama ptrace_scope <= 1); `grab()` raises PermissionError otherwise so tests can skip.
"""

from __future__ import annotations

import ctypes
import os
import socket

_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 share this number
_libc = ctypes.CDLL(None, use_errno=True)


def grab(pid: int) -> list[socket.socket]:
    """Duplicates of every TCP socket `pid` holds (the caller closes them)."""
    pidfd = os.pidfd_open(pid)
    out: list[socket.socket] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (1, 38):  # EPERM, ENOSYS
                    raise PermissionError(err, os.strerror(err))
                continue
            s = socket.socket(fileno=fd)
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                out.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    return out


def find(pid: int, *, local: tuple[str, int] | None = None,
         peer: tuple[str, int] | None = None) -> socket.socket:
    """The socket of `pid` with that local and/or peer address."""
    found = None
    for s in grab(pid):
        try:
            ok = (local is None or s.getsockname()[:2] == local) and (
                peer is None or s.getpeername()[:2] == peer)
        except OSError:
            ok = False
        if ok and found is None:
            found = s
        else:
            s.close()
    if found is None:
        raise LookupError(f"no socket local={local} peer={peer} in pid {pid}")
    return found
