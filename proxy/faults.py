"""Test-only fault hooks: make a generation crash, exit or hang at a named step of a handover.

Tests write "<side>:<step>:<action>" into the file named by $PROXY_TEST_FAULT_FILE, e.g.
"new:before_ready:crash". side: new | old; action: crash (exit 3 at once) | exit (exit 1) |
hang (stop responding at that step) | delay (carry on after DELAY seconds: widens a window
a test wants to land in). The file is read when the step is reached, so a test arms
one upgrade at a time. Never set in production (the README lists it under "test-only"); when
the variable is unset every hook is a dictionary lookup and a return.

Steps: new: start, before_ready, after_conns, after_ack, after_released;
       old: after_ready, after_gate (with workers: released, RELEASED not sent yet),
            after_released, after_conns, before_done;
       migrate_in (host migration, the receiving proxy): before_ack;
       migrate_out (the giving proxy): before_freeze, after_conns;
       worker<K> (worker K of a new generation): start.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from proxy import log

FAULT_ENV = "PROXY_TEST_FAULT_FILE"


def fault(side: str, step: str) -> str | None:
    """The action armed for this step (after carrying out crash/exit), or None."""
    path = os.environ.get(FAULT_ENV)
    if not path:
        return None
    try:
        spec = Path(path).read_text().strip()
    except OSError:
        return None
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == side and parts[1] == step:
        log.warning("test_fault", side=side, step=step, action=parts[2])
        if parts[2] == "crash":
            os._exit(3)
        if parts[2] == "exit":
            os._exit(1)
        return parts[2]
    return None


DELAY = 1.5


async def fault_point(side: str, step: str) -> None:
    action = fault(side, step)
    if action == "hang":
        await trio.sleep_forever()
    elif action == "delay":
        await trio.sleep(DELAY)
