"""How many connections each worker of a generation holds, in memory they all share (a memfd),
so that every worker accepting on the same listening socket takes its share.

With one accept queue shared by N processes, whoever wakes first takes the whole burst (15/5
was seen with 2 workers). nginx answers with `accept_mutex` / its "accept_disabled" rule; ours
is the same idea without a lock: a worker holding clearly more than the least-loaded worker
waits `DELAY` before its next accept, so an idler worker takes the connection first. Never
more than a delay: if the others do not accept (busy, hung), the ahead worker still does.

Fd ownership: the supervisor creates the memfd and passes it to each worker at spawn; each
process maps it once and closes its fd.
"""

from __future__ import annotations

import mmap
import os

SLOT = 8  # one int64 per worker
DELAY = 0.001
SLACK = 4  # ahead means more than the least-loaded worker + max(SLACK, 1/8 of it)


class Loads:
    def __init__(self, fd: int, size: int, index: int = -1) -> None:
        self.size, self.index = size, index
        self._mm = mmap.mmap(fd, size * SLOT)
        self._view = memoryview(self._mm).cast("q")

    @classmethod
    def create(cls, size: int) -> tuple[Loads, int]:
        """A new table and its fd (to pass to workers; the caller closes it)."""
        fd = os.memfd_create("proxy-loads", os.MFD_CLOEXEC)
        os.ftruncate(fd, size * SLOT)
        return cls(fd, size), fd

    def set(self, n: int) -> None:
        if self.index >= 0:
            self._view[self.index] = n

    def clear(self, index: int) -> None:
        self._view[index] = 0

    def ahead(self, mine: int) -> bool:
        others = [self._view[k] for k in range(self.size) if k != self.index]
        if not others:
            return False
        least = min(others)
        return mine > least + max(SLACK, least // 8)
