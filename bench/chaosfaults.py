"""The chaos soak's faults: what each kind does to one scheduled upgrade, and at which step.

See bench/chaos.py's docstring for the list of kinds; bench/chaosoutcome.py follows the upgrade
and judges what became of it.

With workers (`--workers N`, N > 1) "the new generation" / "the old generation" are the
supervisors (the pids the old side logs as child_pid and the pidfile names): kill9_new and
sigstop_new hit the new supervisor, whose workers must follow it (they are checked for strays);
kill9_old_released waits until every old worker logged handed_over, then kills the old
supervisor and every old worker with -9 (the whole old generation); the pairs the killed new
generation could lose are its workers' (the old workers' `phase=released connections=N`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bench.chaosdeploy import Deployment
from bench.chaosoutcome import Record, await_outcome, check_takeback, phase_at, settle, wait_step
from bench.chaoswatch import Line, proc_title
from bench.common import alive

KINDS = ["kill9_new", "sigstop_new", "bad_config", "broken_module", "garbage_peer",
         "usr2_storm", "sigterm_handover", "kill9_old_released"]
# The steps a fault may land on, named for the old generation's phase lines ("spawned" is its
# `event=upgrade_spawned`). A fault on the new generation that lands at "released" hits the
# serving generation: a kill -9 then loses what it already held (the old one serves again), a
# SIGSTOP freezes the service until SIGCONT (nothing is lost; connects wait in the backlog).
EARLY_STEPS = ["spawned", "handshake", "wait_ready", "released"]
STEPS: dict[str, list[str]] = {
    "kill9_new": EARLY_STEPS,
    "sigstop_new": EARLY_STEPS,
    "bad_config": ["before_signal"],
    "broken_module": ["before_signal"],
    # "idle_then_signal": a truncated frame held open on the channel, SIGUSR2 at once: the
    # signal arrives while that peer's session runs and must be queued, not lost (contract).
    "garbage_peer": [*EARLY_STEPS, "idle_then_signal"],
    "usr2_storm": ["before_signal"],
    "sigterm_handover": EARLY_STEPS,
    "kill9_old_released": ["handed_over"],
}


def run_upgrade(d: Deployment, r: Record, rng: random.Random) -> None:
    """One scheduled upgrade: SIGUSR2, the fault of `r` at its step, the outcome, the settling
    after it; all of it recorded in `r`."""
    r.t0 = time.time()
    r.old_pid = d.serving_pid()
    mark = d.w.mark()
    a = d.args
    outcome_timeout = a.upgrade_timeout + 10.0
    if r.kind == "none":
        os.kill(r.old_pid, signal.SIGUSR2)
        r.outcome = await_outcome(d, r, mark, outcome_timeout)
    elif r.kind in ("kill9_new", "sigstop_new"):
        os.kill(r.old_pid, signal.SIGUSR2)
        r.landed = wait_step(d, r, mark, r.step, outcome_timeout)
        if r.landed and r.child_pid:
            r.t_fault = time.time()
            sig = signal.SIGKILL if r.kind == "kill9_new" else signal.SIGSTOP
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.child_pid, sig)
            if r.kind == "sigstop_new":
                # Held past upgrade_timeout. Before RELEASED the old generation must have
                # given up on it and killed it. After RELEASED it *is* the service, frozen:
                # connects wait in the backlog, nothing is lost, and it carries on at
                # SIGCONT (the old one waits for its ACKs, it never serves beside it).
                time.sleep(a.upgrade_timeout + 1.0)
                # (It may have said READY just before the stop: the old one then
                # releases to it while it is frozen. The log says which.)
                released = any(x.event == "phase" and x.pid == r.old_pid
                               and x.fields.get("phase") == "released"
                               for x in d.w.since(mark))
                if released:
                    r.landed = "released"  # it said READY just before the stop
                    r.notes.append("frozen after RELEASED: continued with SIGCONT")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(r.child_pid, signal.SIGCONT)
                elif alive(r.child_pid):
                    r.problems.append(f"stopped child {r.child_pid} still alive "
                                      f"{a.upgrade_timeout + 1:g}s later ({proc_title(r.child_pid)!r})")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(r.child_pid, signal.SIGCONT)
        else:
            r.notes.append(f"fault not applied: the upgrade ended before {r.step}")
        r.outcome = await_outcome(d, r, mark, outcome_timeout)
        if r.kind == "kill9_new" and r.t_fault:
            # Pairs the new generation had ACKed were its own: they die with it (no one
            # else holds their sockets). Only a kill after the handover began can cost any.
            for x in d.w.since(mark):
                if x.event == "phase" and r.old_pid in (x.pid, x.sup) and x.t <= r.t_fault \
                        and x.fields.get("phase") == "released":
                    r.new_held += int(x.fields.get("connections", "0"))
    elif r.kind in ("bad_config", "broken_module"):
        if r.kind == "bad_config":
            d.px.config.write_text(d.good_config + "\n[bogus]\nkey = 1\n")
        else:
            (d.px.dir / "proxy").mkdir(exist_ok=True)
            (d.px.dir / "proxy" / "__init__.py").write_text(
                'raise ImportError("chaos: broken build on disk")\n')
        r.t_fault = time.time()
        os.kill(r.old_pid, signal.SIGUSR2)
        r.outcome = await_outcome(d, r, mark, outcome_timeout)
        d.restore_disk()
    elif r.kind == "garbage_peer":
        garbage_idle(d, r, mark, rng)
        mark = d.w.mark()
        if r.step == "idle_then_signal":
            with held_peer(d):
                r.t_fault = time.time()
                os.kill(r.old_pid, signal.SIGUSR2)
                time.sleep(0.3)
            r.landed = "idle"
            r.outcome = await_outcome(d, r, mark, outcome_timeout)
            if r.outcome == "unknown" and r.ignored:
                r.outcome = "lost"
        else:
            os.kill(r.old_pid, signal.SIGUSR2)
            r.landed = wait_step(d, r, mark, r.step, outcome_timeout)
            r.t_fault = time.time()
            send_garbage(d, random_junk(rng))
            r.outcome = await_outcome(d, r, mark, outcome_timeout)
    elif r.kind == "usr2_storm":
        storm(d, r, mark, outcome_timeout)
    elif r.kind == "sigterm_handover":
        os.kill(r.old_pid, signal.SIGUSR2)
        r.landed = wait_step(d, r, mark, r.step, outcome_timeout)
        target = d.serving_pid()
        r.t_fault = time.time()
        if target:
            os.kill(target, signal.SIGTERM)
            r.notes.append(f"SIGTERM to pid {target} "
                           f"({'old' if target == r.old_pid else 'new'}) in phase {r.landed}")
        d.wait_gone(a.drain_timeout + a.upgrade_timeout + 5.0)
        left = d.live_pids()
        r.outcome = "stopped" if not left else ("ok" if d.serving_pid() else "unknown")
        if left:
            r.problems.append(f"still running after the stop: {left}")
        failed = [x for x in d.w.since(mark) if x.event == "upgrade_failed"]
        if failed:
            r.notes.append(f"rolled back first: {failed[0].fields.get('reason', '')[:80]}")
    elif r.kind == "kill9_old_released":
        os.kill(r.old_pid, signal.SIGUSR2)
        # After `handed_over` the old generation holds only what cannot move yet (a
        # request in progress, a connect in flight). A kill right at RELEASED would take
        # every connection with it (nothing has moved then): the e2e tests cover that.
        old_workers = d.w.workers_of(r.old_pid)
        line = d.w.wait(lambda ln: ln.event in ("handed_over", "upgrade_failed")
                        and ln.pid == r.old_pid, mark, outcome_timeout)
        r.landed = "handed_over" if line is not None and line.event == "handed_over" else ""
        if r.landed and old_workers:
            # The supervisor's handed_over comes at RELEASED (it moves nothing itself): wait
            # for every old worker's own, which ends its handover.
            live = [w for w in old_workers if alive(w)]
            done: set[int] = set()

            def all_handed(ln: Line) -> bool:
                if ln.event in ("handed_over", "upgrade_failed") and ln.pid in live:
                    done.add(ln.pid)
                return done >= set(live)

            if not live or d.w.wait(all_handed, mark, outcome_timeout) is None:
                r.landed = ""
                r.notes.append(f"old workers {sorted(set(live) - done)} never logged handed_over")
        if r.landed:
            r.t_fault = time.time()
            for pid in [r.old_pid, *old_workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if old_workers:
                r.notes.append(f"killed -9: supervisor {r.old_pid} and workers {old_workers}")
        r.outcome = await_outcome(d, r, mark, outcome_timeout)
        if r.outcome == "ok" and r.new_pid:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and d.serving_pid() != r.new_pid:
                time.sleep(0.01)
            if d.serving_pid() != r.new_pid:
                r.problems.append(f"new pid {r.new_pid} not serving after the old was killed")
    if r.outcome == "ok" and r.new_pid:
        deadline = time.monotonic() + 3.0  # the pidfile is written just before the line
        while time.monotonic() < deadline and d.serving_pid() != r.new_pid:
            time.sleep(0.005)
        if d.serving_pid() != r.new_pid:
            r.problems.append(f"takeover_serving from {r.new_pid} but the pidfile names "
                              f"{d.pidfile_pid()}")
    if r.t_fault and r.landed and r.landed != "idle":
        r.landed = phase_at(d, r, mark)
    settle(d, r)
    check_takeback(d, r, mark)
    r.ignored = sum(1 for x in d.w.since(mark) if x.event == "upgrade_ignored")
    r.t1 = time.time()


def storm(d: Deployment, r: Record, mark: int, timeout: float) -> None:
    """5 SIGUSR2 within 100 ms, each to the pid the pidfile names at that moment. By the
    contract the first starts an upgrade and the others, arriving during its handover, are
    queued and coalesced into one more upgrade right after it: 2 in all."""
    r.t_fault = time.time()
    for _ in range(5):
        pid = d.serving_pid()
        if pid:
            os.kill(pid, signal.SIGUSR2)
        time.sleep(0.02)
    r.outcome = await_outcome(d, r, mark, timeout)
    # Queued upgrades follow the first one's outcome: see each one through.
    after = r.outcome_line + 1
    for _ in range(6):
        if after <= 0:
            break
        nxt = d.w.wait(lambda x: x.event == "upgrade_spawned", after, 3.0)
        if nxt is None:
            break
        sub = Record(r.idx, r.kind, r.step, old_pid=nxt.pid)
        if await_outcome(d, sub, nxt.n, timeout) == "ok":
            r.new_pid = sub.new_pid
        r.successes += sub.successes
        after = sub.outcome_line + 1
    spawns = [x for x in d.w.since(mark) if x.event == "upgrade_spawned"]
    r.notes.append(f"{len(spawns)} upgrade(s) started, {r.successes} succeeded")
    if r.successes != 2:
        r.problems.append(f"{r.successes} upgrade(s) carried out; contract: 2 (the first, "
                          f"then the other signals queued and coalesced into one)")


def channel(d: Deployment) -> Path:
    return d.px.dir / "proxy.takeover"


def send_garbage(d: Deployment, junk: bytes) -> None:
    """Connect to the takeover socket, send `junk`, hang up; bounded."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(channel(d)))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(100)
        except OSError:
            pass


def garbage_idle(d: Deployment, r: Record, mark: int, rng: random.Random) -> None:
    for junk in garbage_corpus(rng):
        send_garbage(d, junk)
    dropped = d.w.wait(lambda x: x.event in ("takeover_peer_dropped",
                                             "takeover_peer_refused"), mark, 5.0)
    if dropped is None:
        r.problems.append("idle garbage: no takeover_peer_dropped line within 5 s")
    # Let the last dropped session end before the upgrade (that case is idle_then_signal).
    d.w.wait(lambda x: x.event == "phase" and x.pid == r.old_pid
             and x.fields.get("phase") == "serving", mark, 2.0)


@contextlib.contextmanager
def held_peer(d: Deployment) -> Iterator[None]:
    """A peer that sends half a HELLO frame and holds the channel's one session slot."""
    from proxy.frames import encode
    from proxy.takeover import MsgType

    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(2.0)
        with contextlib.suppress(OSError):
            s.connect(str(channel(d)))
            s.sendall(encode(MsgType.HELLO, {"pid": 1})[:-3])
        yield
    finally:
        s.close()


def garbage_corpus(rng: random.Random) -> list[bytes]:
    return [b"GET / HTTP/1.1\r\n\r\n", b"PXTK\x00\x01\x00\x01\xff\xff" + b"x" * 50,
            b"PXTK\x00\x01\x00\x05\x00\x00\x7f\xff\xff\xff\x00\x00\x00\x00",  # oversized head
            random_junk(rng)]


def random_junk(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))

