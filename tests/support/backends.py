"""Upstream servers for tests: real TCP servers on 127.0.0.1, one thread per connection.

`Backend(handler)` binds port 0, serves until `close()`, and closes every connection it accepted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

Handler = Callable[[socket.socket, "Backend"], None]


class Backend:
    def __init__(self, handler: Handler, name: str = "backend", backlog: int = 1024) -> None:
        self.handler = handler
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(conn: socket.socket, backend: Backend) -> None:
    """Echo every byte; on EOF shut the write side (half-close passes through)."""
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def named_echo(conn: socket.socket, backend: Backend) -> None:
    """Say the backend's name on a line, then echo."""
    conn.sendall(backend.name.encode() + b"\n")
    echo(conn, backend)


def dead_port() -> int:
    """A loopback port nothing listens on (connect gets RST at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Blackhole:
    """A loopback address whose SYNs are dropped: listen(0), never accept, queue pre-filled.
    Connects to it hang until the caller's timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(f)

    def close(self) -> None:
        for f in self.fillers:
            f.close()
        self.sock.close()
