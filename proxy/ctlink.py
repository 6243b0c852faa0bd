"""The trio adapter of the supervisor-worker control line (`workerctl.py` is the protocol).

One `ControlLink` per socketpair end. Sends are serialised by a lock (several tasks answer
polls and report phases); `receive()` returns None at EOF. The link owns its socket and closes
it in `close()`.
"""

from __future__ import annotations

import socket

import trio

from proxy.workerctl import LineDecoder, Message, encode


class ControlLink:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._decoder = LineDecoder()
        self._ready: list[Message] = []
        self._lock = trio.Lock()
        self.closed = False

    async def send(self, msg: Message) -> bool:
        """False when the other side is gone (the caller decides what that means)."""
        async with self._lock:
            try:
                await self.stream.send_all(encode(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return True

    async def receive(self) -> Message | None:
        """The next message; None at EOF. Raises workerctl.ControlError on garbage."""
        while not self._ready:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.socket.close()
