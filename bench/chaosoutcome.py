"""Following one scheduled upgrade through the proxy's log: the step it reached, how it ended,
whether an old generation took the service back from a successor, and the settling after it
(one generation serving, no strays, every client progressing); the Record of it all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

from bench.chaosdeploy import Deployment
from bench.chaoswatch import Line, proc_state, proc_title
from bench.common import alive, kill_pid

PHASE_ORDER = {"spawned": 0, "spawning": 0, "handshake": 1, "wait_ready": 2, "handover": 3,
               "released": 4, "done": 5}


@dataclass
class Record:
    """One scheduled upgrade and what became of it."""

    idx: int
    kind: str
    step: str
    t0: float = 0.0
    t1: float = 0.0
    t_fault: float = 0.0
    old_pid: int = 0
    new_pid: int = 0
    child_pid: int = 0
    landed: str = ""  # the old generation's phase when the fault hit
    outcome: str = ""  # ok | rolled back | stopped | lost | unknown
    successes: int = 0
    ignored: int = 0
    restarted: bool = False
    outcome_line: int = -1  # LogWatch index of the line that decided the outcome
    new_held: int = 0  # at most this many pairs were the killed new generation's to lose
    strays: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what happened
    problems: list[str] = field(default_factory=list)  # what should not have


def wait_step(d: Deployment, r: Record, mark: int, step: str, timeout: float) -> str:
    """Wait until the upgrade under way reached `step` (or a later one); returns the old
    generation's phase then ('' if the upgrade ended or timed out first)."""
    want = PHASE_ORDER[step]

    def reached(line: Line) -> bool:
        if line.event == "upgrade_spawned" and line.pid == r.old_pid:
            r.child_pid = int(line.fields.get("child_pid", "0"))
            return want == 0
        if line.event == "upgrade_failed" and line.pid == r.old_pid:
            return True
        # The old side logs phase=spawning before upgrade_spawned: no step counts before
        # we know the child's pid (every fault after "spawned" needs it).
        if line.event == "phase" and line.pid == r.old_pid and r.child_pid:
            ph = line.fields.get("phase", "")
            if ph == "handshake" and line.fields.get("peer_pid") != str(r.child_pid):
                return False  # a session of some other peer (our garbage)
            return PHASE_ORDER.get(ph, -1) >= want
        return False

    line = d.w.wait(reached, mark, timeout)
    if line is None or line.event == "upgrade_failed":
        return ""
    return "spawned" if line.event == "upgrade_spawned" else line.fields.get("phase", "")


def await_outcome(d: Deployment, r: Record, mark: int, timeout: float) -> str:
    """ok (another pid took over, stays alive and the pidfile names it), rolled back
    (upgrade_failed and the old pid still serves), stopped (nothing alive serves), or
    unknown. A takeover_serving is only a candidate: a fault may kill that generation right
    after it, and the old one then takes the service back."""
    deadline = time.monotonic() + timeout
    seen = mark
    candidate: Line | None = None
    while time.monotonic() < deadline:
        new = d.w.since(seen)
        seen += len(new)
        for line in new:
            if line.worker >= 0:  # a worker's own line: generations decide outcomes
                continue
            if line.event == "takeover_serving" and line.pid != r.old_pid:
                candidate = line
            if line.event == "upgrade_failed" and line.pid == r.old_pid:
                r.outcome_line = line.n
                r.notes.append(f"upgrade_failed: {line.fields.get('reason', '')[:120]}")
                if candidate is not None:
                    r.notes.append(f"after pid {candidate.pid} had logged takeover_serving")
                return "rolled back" if alive(r.old_pid) else "stopped"
            if line.event == "upgrade_ignored" and line.pid == r.old_pid:
                r.ignored += 1
        # A takeover is settled once the old side said RELEASED (it takes nothing back
        # unless the new one dies) or the old one is gone.
        if candidate is not None and alive(candidate.pid) and \
                d.pidfile_pid() == candidate.pid and \
                (not alive(r.old_pid) or d.w.phase_of(r.old_pid) in ("released", "done")):
            r.new_pid = candidate.pid
            r.successes += 1
            r.outcome_line = candidate.n
            return "ok"
        if not d.serving_pid() and not alive(r.old_pid):
            time.sleep(0.2)  # the pidfile may be switching right now
            if not d.serving_pid():
                return "stopped"
        time.sleep(0.005)
    return "unknown"


def check_takeback(d: Deployment, r: Record, mark: int) -> None:
    """An old generation must never kill a successor that already serves (it owns the
    pairs it ACKed): look for upgrade_child_killed after that child's takeover_serving."""
    serving_at: dict[int, float] = {}
    for x in d.w.since(mark):
        if x.worker >= 0:
            continue
        if x.event == "takeover_serving":
            serving_at[x.pid] = x.t
        elif x.event == "upgrade_child_killed":
            child = int(x.fields.get("child_pid", "0"))
            if child in serving_at:
                r.problems.append(
                    f"pid {x.pid} killed its successor {child} "
                    f"{(x.t - serving_at[child]) * 1000:.0f} ms after that one served "
                    f"(its ACKed pairs die with it)")
                if r.outcome == "ok" and child == r.new_pid:
                    r.outcome = "rolled back"
                    r.successes -= 1


def stray_workers(d: Deployment, serving: int) -> list[tuple[int, int]]:
    """(worker pid, supervisor pid) of live workers not of the `serving` generation."""
    with d.w.lock:
        workers = dict(d.w.workers)
    return [(w, s) for w, s in workers.items() if s != serving and alive(w)]


def phase_at(d: Deployment, r: Record, mark: int) -> str:
    """The old generation's phase when the fault hit, by the log's timestamps (ms): the
    step line we waited for is a few ms old by the time the fault lands."""
    phase = r.landed
    for x in d.w.since(mark):
        if x.t > r.t_fault:
            break
        if x.event == "phase" and x.pid == r.old_pid and \
                PHASE_ORDER.get(x.fields.get("phase", ""), -1) > PHASE_ORDER.get(phase, -1):
            phase = x.fields.get("phase", "")
    return phase


def settle(d: Deployment, r: Record) -> None:
    """After an outcome: a generation serves (else start one), the others exit within
    drain_timeout (else they are strays: reported and killed), every client progresses."""
    if not d.serving_pid():
        # Bounded: whatever is left finishes its drain (or takes the service back).
        deadline = time.monotonic() + d.args.drain_timeout + d.args.upgrade_timeout + 5
        while time.monotonic() < deadline and d.live_pids() and not d.serving_pid():
            time.sleep(0.05)
        if not d.serving_pid():
            d.wait_gone(d.args.drain_timeout + 3.0)
            d.restore_disk()
            d.px.restart()
            r.restarted = True
    deadline = time.monotonic() + d.args.drain_timeout + 3.0
    while time.monotonic() < deadline:
        if not [p for p in d.live_pids() if p != d.serving_pid()]:
            break
        time.sleep(0.02)
    serving = d.serving_pid()  # never a stray, whatever happened meanwhile
    for pid in [p for p in d.live_pids() if p != serving]:
        phase = d.w.phase_of(pid, "?")
        r.strays.append(f"pid {pid} ({proc_title(pid)!r}, state {proc_state(pid)}, "
                        f"last phase {phase})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        kill_pid(pid, timeout=2.0, sig=signal.SIGKILL)
    # Workers: only the serving generation's may outlive this (an old generation's workers
    # exit before it does; a dead supervisor's must follow it).
    while time.monotonic() < deadline and stray_workers(d, serving):
        time.sleep(0.02)
    for pid, sup in stray_workers(d, serving):
        r.strays.append(f"worker pid {pid} of generation {sup} ({'alive' if alive(sup) else 'gone'}"
                        f"; {proc_title(pid)!r}, state {proc_state(pid)})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        kill_pid(pid, timeout=2.0, sig=signal.SIGKILL)
    stuck = d.wait_progress(d.args.client_timeout)
    if stuck:
        r.problems.append(f"no progress within {d.args.client_timeout:g}s: {', '.join(stuck)}")
