"""A deliberately small HTTP/1.1 client over a raw socket, so tests see exactly what goes on the
wire: same connection across requests, pipelining, byte-exact bodies."""

from __future__ import annotations

import socket


class Conn:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.local = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError(f"connection closed (buffered: {self.buf[:80]!r})")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one response (skipping 1xx other than 101)."""
        while True:
            status = int(self._line().split(b" ", 2)[1])
            headers: dict[str, str] = {}
            while line := self._line():
                k, v = line.decode("latin-1").split(":", 1)
                headers[k.strip().lower()] = v.strip()
            if 100 <= status < 200 and status != 101:
                continue
            break
        if head_only or status in (101, 204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int(self._line().split(b";")[0], 16):
                body += self._exact(size)
                self._line()
            while self._line():
                pass
            return status, headers, bytes(body)
        if "content-length" in headers:
            return status, headers, self._exact(int(headers["content-length"]))
        while True:  # close-delimited
            try:
                self._fill()
            except EOFError:
                out, self.buf = self.buf, b""
                return status, headers, out

    def get(self, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
        self.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        return self.response()
