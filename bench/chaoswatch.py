"""Watching the chaos soak's proxy: its log, read incrementally, and a sampler thread that
counts the generations serving.

"Serving" is defined in bench/chaos.py's docstring: a live, not stopped process whose latest
`event=phase` line says it accepts.

With workers (`[proxy] workers` > 1) a generation is its supervisor: the pid in the pidfile,
the one whose phase lines count. A worker's own lines (its pid is one a supervisor logged as
`worker_pid` in `worker_spawned` / `worker_restarted`) are kept in the same list, marked with
`worker` and `sup` (its supervisor), and count neither as a generation nor as its phase.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import alive, log_time

# The phases in which a generation accepts: the old side does until just before RELEASED.
ACCEPTING = {"serving", "spawning", "handshake", "wait_ready", "handover"}

SERVING_TITLE = re.compile(r"generation \d+ serving( \(\d+ workers\))?$")
LINE_RX = re.compile(r"^(\S+) level=(\w+) event=(\S+) gen=(\d+) pid=(\d+)(.*)$")
FIELD_RX = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass
class Line:
    n: int  # index in LogWatch.lines
    t: float
    event: str
    pid: int
    fields: dict[str, str]
    worker: int = -1  # a worker process's own line: its index (-1: a generation's line)
    sup: int = 0  # ... and its supervisor's pid


class LogWatch:
    """Incremental reader of the proxy log (shared by the sampler thread and the schedule):
    parsed lines, the latest phase of each pid, every pid seen (child_pid included)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.lines: list[Line] = []
        self.phase: dict[int, str] = {}
        self.pids: set[int] = set()
        self.workers: dict[int, int] = {}  # worker pid -> its supervisor's pid
        self.lock = threading.Lock()

    def poll(self) -> int:
        """Read what was appended; returns the number of lines now known."""
        with self.lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except OSError:
                return len(self.lines)
            self.offset += len(data)
            *complete, self.rest = (self.rest + data).split(b"\n")
            for raw in complete:
                self._parse(raw.decode(errors="replace"))
            return len(self.lines)

    def _parse(self, text: str) -> None:
        m = LINE_RX.match(text)
        if not m:
            return
        try:
            t = log_time(m.group(1))
        except ValueError:
            return
        fields = {k: v.strip('"') for k, v in FIELD_RX.findall(m.group(6))}
        pid = int(m.group(5))
        line = Line(len(self.lines), t, m.group(3), pid, fields)
        if pid in self.workers:
            line.worker, line.sup = int(fields.get("worker", "0")), self.workers[pid]
            self.lines.append(line)
            return
        self.lines.append(line)
        self.pids.add(line.pid)
        if line.event in ("worker_spawned", "worker_restarted") and \
                fields.get("worker_pid", "").isdigit():
            self.workers[int(fields["worker_pid"])] = pid
        if line.event == "phase":
            self.phase[line.pid] = fields.get("phase", "")
        if "child_pid" in fields and fields["child_pid"].isdigit():
            self.pids.add(int(fields["child_pid"]))

    def since(self, mark: int) -> list[Line]:
        self.poll()
        with self.lock:
            return self.lines[mark:]

    def mark(self) -> int:
        return self.poll()

    def workers_of(self, sup: int) -> list[int]:
        """Every worker pid generation `sup` ever logged (live or not)."""
        with self.lock:
            return sorted(w for w, s in self.workers.items() if s == sup)

    def phase_of(self, pid: int, default: str = "") -> str:
        """The phase of `pid`'s latest phase line."""
        with self.lock:
            return self.phase.get(pid, default)

    def wait(self, pred: Callable[[Line], bool], mark: int, timeout: float,
             give_up: Callable[[], bool] | None = None) -> Line | None:
        """The first line after `mark` for which `pred` holds, within `timeout` (None if not)."""
        deadline = time.monotonic() + timeout
        seen = mark
        while True:
            new = self.since(seen)
            for line in new:
                if pred(line):
                    return line
            seen += len(new)
            if time.monotonic() > deadline or (give_up is not None and give_up()):
                return None
            time.sleep(0.002)


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ('' when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class Sample:
    t: float
    serving: list[int]  # pids that accept per their phase line (alive, not stopped)
    good: bool  # exactly one serving and the pidfile names it
    titles_serving: int  # processes whose title says "serving" (a cross-check)


class Sampler(threading.Thread):
    """Every `interval` s: which generations serve. Runs in the orchestrator, never in the load process."""

    def __init__(self, watch: LogWatch, pidfile: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.watch = watch
        self.pidfile = pidfile
        self.interval = interval
        self.samples: list[Sample] = []
        self.dead: set[int] = set()
        self.halt = threading.Event()

    def live_pids(self) -> list[int]:
        self.watch.poll()
        with self.watch.lock:
            pids = sorted(self.watch.pids - self.dead)
        out = []
        for pid in pids:
            if alive(pid):
                out.append(pid)
            else:
                self.dead.add(pid)
        return out

    def sample(self) -> Sample:
        t = time.time()
        live = self.live_pids()
        try:
            pf = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            pf = 0
        with self.watch.lock:
            phases = dict(self.watch.phase)
        serving = [p for p in live if phases.get(p) in ACCEPTING and proc_state(p) not in "TtZ"]
        # (a supervisor's title is "... serving (N workers)"; workers are not in `live`)
        titles = sum(1 for p in live if SERVING_TITLE.search(proc_title(p)))
        return Sample(t, serving, len(serving) == 1 and serving[0] == pf, titles)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.samples.append(self.sample())

