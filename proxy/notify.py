"""What the outside sees of a process: sd_notify (systemd, or whoever set $NOTIFY_SOCKET) and
the `ps` title (`proxy: generation N serving|handing over|draining|taking over`)."""

from __future__ import annotations

import os
import socket

from proxy import log


def notify(*fields: str) -> bool:
    """Send `READY=1`-style fields to $NOTIFY_SOCKET; False when unset or unreachable."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), addr)
    except OSError as exc:
        log.warning("sd_notify_failed", socket=path, error=str(exc))
        return False
    return True


def title(text: str) -> None:
    """Set the process title to `proxy: <text>` (cosmetic: a no-op without setproctitle)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        return
    setproctitle.setproctitle(f"proxy: {text}")
