"""The garbage collector around handovers: off while connection batches flow, on otherwise.

Used by both sides of a takeover (`upgrade.py`, `adopt.py`). No I/O.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# GC_NOTE: a generation holding N pairs tracks ~80 objects per pair; a full collection over
# them stops the process for up to hundreds of ms at 10k pairs, and a handover (old: pausing
# them all; new: allocating them all) triggers several. So the collector is off while a
# handover moves batches on either side (sessions may overlap: a depth count), and the new
# generation freezes what it adopted when the batches stop coming (long-lived relays need not be
# scanned again). Never while a side merely waits: a slow request may take drain_timeout.
_gc_depth = 0


class GcPause:
    """One holder's pause of the collector; the collector runs again when no holder pauses it.
    `resume(freeze=True)` first moves everything alive to the permanent generation."""

    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        global _gc_depth
        if not self.paused:
            self.paused = True
            _gc_depth += 1
            gc.disable()

    def resume(self, freeze: bool = False) -> None:
        global _gc_depth
        if self.paused:
            self.paused = False
            _gc_depth -= 1
            if freeze:
                gc.freeze()
            if _gc_depth == 0:
                gc.enable()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    pause = GcPause()
    pause.pause()
    try:
        yield
    finally:
        pause.resume()
