"""A worker process's side of its supervisor: what it was given at spawn, and its control line.

A worker (`python -m proxy run --config PATH --worker K`, started only by a supervisor) is an
ordinary generation process (`generation.run`) with three differences, all decided here:
- it gets its sockets from the supervisor at spawn (`$PROXY_WORKER`, JSON): the listening
  sockets, its own takeover channel (`<takeover_socket>.w<K>`) and the control socketpair; it
  binds nothing and writes no pidfile;
- it serves when its supervisor says SERVE (the generation's commit point), not when a takeover
  session says RELEASED: a new worker may take connections from several old workers (`peers`,
  their channel paths), and the generation serves as one;
- an old worker's takeover session waits at READY for the supervisor's RELEASE (`gate()`), so
  the old generation releases all of its workers or none.

Fd ownership: the fds named in the spec are ours from the start; `WorkerSpec.take_*` wraps each
in a socket object exactly once (the caller closes it).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy import log
from proxy.ctlink import ControlLink
from proxy.loads import Loads
from proxy.workerctl import (
    Abort,
    ControlError,
    Failed,
    PeerReady,
    Poll,
    Ready,
    Release,
    Released,
    Report,
    Serve,
    Serving,
    SuccessorLost,
)

SPEC_ENV = "PROXY_WORKER"
CHANNEL_SUFFIX = ".w"


def channel_path(takeover_socket: Path, index: int) -> Path:
    """Worker K's takeover channel: where the next generation's workers connect to take its
    connections."""
    return takeover_socket.with_name(f"{takeover_socket.name}{CHANNEL_SUFFIX}{index}")


class GateClosed(Exception):
    """The supervisor did not let this worker release its successor (str() says why)."""


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    generation: int
    control_fd: int
    listener_fds: dict[str, int]
    channel_fd: int
    peers: tuple[str, ...]  # channel paths of the old workers this one takes connections from
    loads_fd: int  # the generation's load table (loads.py)
    size: int  # workers in the generation

    def to_env(self) -> str:
        return json.dumps({"index": self.index, "generation": self.generation,
                           "control_fd": self.control_fd, "listeners": self.listener_fds,
                           "channel_fd": self.channel_fd, "peers": list(self.peers),
                           "loads_fd": self.loads_fd, "size": self.size})

    @classmethod
    def from_env(cls) -> WorkerSpec:
        """Raises ValueError: a worker started by hand, or by a supervisor of another release."""
        raw = os.environ.pop(SPEC_ENV, None)
        if raw is None:
            raise ValueError(f"${SPEC_ENV} is not set: workers are started by their supervisor")
        d = json.loads(raw)
        return cls(int(d["index"]), int(d["generation"]), int(d["control_fd"]),
                   {str(k): int(v) for k, v in d["listeners"].items()}, int(d["channel_fd"]),
                   tuple(str(p) for p in d["peers"]), int(d["loads_fd"]), int(d["size"]))

    def take_listeners(self) -> dict[str, socket.socket]:
        return {k: socket.socket(fileno=fd) for k, fd in self.listener_fds.items()}

    def take_loads(self) -> Loads:
        try:
            return Loads(self.loads_fd, self.size, self.index)
        finally:
            os.close(self.loads_fd)

    def take_channel(self) -> socket.socket:
        sock = socket.socket(fileno=self.channel_fd)
        sock.setblocking(False)
        return sock


class WorkerLink:
    """The worker's end of the control line: answers polls with its metrics (the heartbeat),
    takes SERVE, RELEASE and ABORT."""

    def __init__(self, sock: socket.socket, report: Callable[[int], Report]) -> None:
        self.link = ControlLink(sock)
        self.report = report
        self.serve = trio.Event()
        self.gone = trio.Event()  # the supervisor hung up (it died, or sent garbage)
        self._gate: trio.MemorySendChannel[str | None] | None = None
        self._verdict: trio.MemorySendChannel[bool] | None = None  # SUCCESSOR_LOST's answer

    async def run(self) -> None:
        try:
            while True:
                msg = await self.link.receive()
                if msg is None:
                    break
                if isinstance(msg, Poll):
                    await self.link.send(self.report(msg.seq))
                elif self._verdict is not None and isinstance(msg, Serve | Abort):
                    self._verdict.send_nowait(isinstance(msg, Serve))
                elif isinstance(msg, Serve):
                    self.serve.set()
                elif isinstance(msg, Release | Abort):
                    gate = self._gate
                    if gate is not None:
                        gate.send_nowait(msg.reason if isinstance(msg, Abort) else None)
                    elif isinstance(msg, Release):  # our session broke meanwhile
                        await self.link.send(Failed("no successor waits for RELEASE here"))
                    else:
                        await self.link.send(Abort("acknowledged"))
                else:
                    log.warning("control_unexpected", message=type(msg).__name__)
        except ControlError as exc:
            log.error("control_garbage", error=str(exc))
        self.gone.set()

    async def send(self, msg: Ready | PeerReady | Released | Serving | Failed) -> None:
        await self.link.send(msg)

    async def successor_lost(self, timeout: float) -> bool:
        """Our successor died after RELEASED, with what it had not ACKed back with us: does our
        supervisor say serve on (the whole new generation is gone) or finish and exit?"""
        send, recv = trio.open_memory_channel[bool](1)
        self._verdict = send
        try:
            await self.link.send(SuccessorLost())
            with trio.move_on_after(timeout):
                return await recv.receive()
            return False
        finally:
            self._verdict = None

    async def gate(self, channel: socket.socket, timeout: float) -> None:
        """An old worker whose successor said READY: may it release? Returns on RELEASE;
        raises GateClosed on ABORT, on the successor hanging up, or after `timeout`."""
        send, recv = trio.open_memory_channel[str | None](1)
        self._gate = send
        try:
            await self.link.send(PeerReady())
            log.info("worker_gating", reason="the successor said READY: waiting for RELEASE")
            reason: str | None = "no RELEASE from the supervisor in time"
            async with trio.open_nursery() as nursery:
                async def hangup() -> None:
                    nonlocal reason
                    await trio.lowlevel.wait_readable(channel)  # the peer says nothing now
                    reason = "the successor hung up while waiting for RELEASE"
                    nursery.cancel_scope.cancel()

                async def supervisor_gone() -> None:
                    nonlocal reason
                    await self.gone.wait()
                    reason = "the supervisor is gone"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hangup)
                nursery.start_soon(supervisor_gone)
                with trio.move_on_after(timeout):
                    reason = await recv.receive()
                nursery.cancel_scope.cancel()
        finally:
            self._gate = None
        if reason is not None:
            await self.link.send(Abort("acknowledged"))
            raise GateClosed(reason)
