"""The chaos soak's http backend: the tests' HTTP/1.1 backend in a process of its own, and the
handle that runs it.

    python bench/chaosweb.py      # prints port=N, then serves until SIGTERM

Keep-alive, `/slow?ms=`, `/ws` that answers an `Upgrade` with 101 and then echoes; an answer
names the path it was asked for (tests/support/httpbackend.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import os
import re
import signal
import subprocess
import time

from bench.common import ROOT, Helper, read_line


def main() -> int:
    """The backend (threads, stdlib); prints port=N."""
    from tests.support.httpbackend import HttpBackend

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    backend = HttpBackend()
    print(f"port={backend.port}", flush=True)
    while True:
        time.sleep(3600)


class WebBackend(Helper):
    """This module's backend process, started and stopped like common's helpers."""

    def __init__(self) -> None:
        super().__init__("web")

    def start(self) -> WebBackend:
        proc = self._spawn([sys.executable, str(Path(__file__).resolve())],
                           stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        m = re.fullmatch(r"port=(\d+)", read_line(proc.stdout, 15.0, self.role, self.log))
        if not m:
            raise RuntimeError(f"{self.role} helper did not say its port")
        self.port = int(m.group(1))
        return self


if __name__ == "__main__":
    sys.exit(main())
