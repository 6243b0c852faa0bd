"""A single-process generation (`workers = 1`) as its own worker 0, so that it can hand over to a
generation with workers, and take over from one, like any generation of this release.

From protocol 4 on, connections never travel on the generation's takeover session: the new
side connects to each worker channel announced in LISTENERS (`__worker__@<path>`) and takes
that worker's connections over that channel's own session, which waits at READY until the
old generation releases all of its workers at once. A single process serves one such channel,
`<takeover_socket>.w0`, with a second `Upgrader` in worker mode; `LocalGate` is the in-process
version of what supervisor.Pool.gate and worker.WorkerLink.gate say to each other over a
control line:

    worker session (.w0):  successor READY -> worker_gate(): gating, wait for the decision
    generation session:    READY -> generation_gate(): wait until gating, release, wait until
                           the worker session sent RELEASED -> RELEASED (our generation's
                           counters, plus the worker session's base: carried()) -> the
                           worker channel's Upgrader exits (Hooks.via_workers) -> DONE

A peer that speaks protocol 3 or lower (the previous release) gets the classic session: the
connections travel on the generation session and the worker channel stays unused.
"""

from __future__ import annotations

from typing import Any

import trio

from proxy.channel import Channel
from proxy.takeover import WORKERS_SINCE
from proxy.upgrade import SessionFailed


class LocalGate:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._gating = trio.Event()
        self._decision: trio.MemorySendChannel[str | None] | None = None
        self._released = trio.Event()
        self._base: dict[str, list[Any]] = {}
        self._committed = False

    def is_committed(self) -> bool:
        """The worker session was released in this attempt: it can no longer roll back."""
        return self._committed

    async def worker_gate(self, ch: Channel) -> None:
        """The worker session's successor said READY: wait for the generation's decision."""
        send, recv = trio.open_memory_channel[str | None](1)
        self._decision = send
        self._gating.set()
        reason: str | None = "no RELEASE from the generation session in time"
        try:
            async with trio.open_nursery() as nursery:
                async def hangup() -> None:
                    nonlocal reason
                    await trio.lowlevel.wait_readable(ch.sock)
                    reason = "the successor hung up while waiting for RELEASE"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hangup)
                with trio.move_on_after(self.timeout):
                    reason = await recv.receive()
                nursery.cancel_scope.cancel()
        finally:
            self._decision = None
            self._gating = trio.Event()
        if reason is not None:
            raise SessionFailed(reason)

    async def worker_released(self, base: dict[str, list[Any]]) -> None:
        self._base = base
        self._released.set()

    def carried(self) -> dict[str, list[Any]]:
        """What the worker channel's RELEASED held back (its traffic base): the generation
        session's RELEASED carries it (upgrade.Hooks.carried)."""
        return self._base

    async def generation_gate(self, ch: Channel) -> None:
        """The new generation said READY: release the worker session (it must be waiting)."""
        self._committed = False
        if (ch.session.version or 1) < WORKERS_SINCE:
            return  # the classic session: connections travel on the generation session
        with trio.move_on_after(self.timeout):
            await self._gating.wait()
        if self._decision is None:
            raise SessionFailed("no successor waits at READY on the worker channel")
        self._released = trio.Event()
        self._base = {}
        self._committed = True  # (until the next attempt: our worker session moves on)
        self._decision.send_nowait(None)
        with trio.move_on_after(self.timeout):
            await self._released.wait()
        # (committed either way: a worker session that broke at this point resumes its
        # connections and finishes them here; see upgrade.py)

    def rolled_back(self, reason: str) -> None:
        if self._decision is not None:
            self._decision.send_nowait(reason)
