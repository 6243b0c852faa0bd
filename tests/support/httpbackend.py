"""An HTTP/1.1 upstream for tests (stdlib http.server, a thread per connection).

Routes: GET /echo (JSON of path and headers), POST /upload (counts and hashes the body, either
framing), GET /big?n=N (N bytes, chunked, generated), GET /slow?ms=M (answers after M ms),
GET /ws with `Upgrade` (101, then echoes raw bytes). Every request is recorded in `requests`,
every accepted connection counted in `connections`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: HttpBackend

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers)))

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        if url.path == "/ws" and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            sock = self.connection
            while data := sock.recv(65536):
                sock.sendall(data)
            self.close_connection = True
            return
        if url.path == "/big":
            n = int(q["n"][0])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = hashlib.sha256(b"big").digest() * 2048  # 64 KiB
            left = n
            while left:
                piece = block[:min(left, len(block))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                left -= len(piece)
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/slowbody":  # no length: the body ends when we close (h11's copy path)
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"first half;")
            self.wfile.flush()
            time.sleep(int(q["ms"][0]) / 1000)
            self.wfile.write(b"second half")
            self.close_connection = True
            return
        if url.path == "/sse":  # server-sent events: chunked, one event every `ms`
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q["n"][0])):
                event = b"id: %d\ndata: event %d\n\n" % (i, i)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(int(q.get("ms", ["10"])[0]) / 1000)
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/slow":
            time.sleep(int(q["ms"][0]) / 1000)
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self._reply(200, body)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._record()
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    h.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", 0))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        self._reply(200, json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode())


class HttpBackend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self.port: int = self.server_address[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> HttpBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
