"""Chaos soak: many hot upgrades under mixed load, a third of them with a fault injected.

What it measures, per fault kind: how the upgrades ended (new generation serving, rolled back,
service stopped), the client-visible errors, whether exactly one generation served at every
sampled moment, and the worst stall a client saw. Goals (from the issue): 0 client-visible
errors for every fault that leaves a generation serving; never two serving generations; a kill -9
of the old generation loses only what it still held.

    python bench/chaos.py                      # 100 upgrades, a fault on about a third
    python bench/chaos.py --upgrades 20 --seed 7 --json /tmp/chaos.json
    python bench/chaos.py --upgrades 15 --faults-all --fault-rate 0   # what the test runs

Processes (everything on 127.0.0.1, each stopped by pid, every wait bounded):
* backends: the epoll echo helper of bench/common.py, and the tests' HTTP/1.1 backend (keep-alive,
  `/slow?ms=`, `/ws` that answers an `Upgrade` with 101 and then echoes) in a process of its own
  (`python bench/chaosweb.py`);
* the proxy (`python -m proxy run`, cwd = its temp dir) with a tcp listener in front of the echo
  backend and an http listener in front of the http backend, fixed ports so that a fresh proxy
  started after a stop serves the same addresses; every later generation is found in its log;
* the load (`python bench/chaosload.py`, one trio process): sequence-checked tcp streams, short
  tcp connections, http keep-alive clients, one Upgrade tunnel with sequence checks, one client
  of a slow endpoint. It writes every client-visible error and every stall over 100 ms, stamped
  with wall-clock time (the proxy's log uses it too), to a JSONL file;
* this process: the fault schedule, and a sampler thread that every --sample-ms reads the pidfile
  and the proxy log and counts the generations serving.

"Serving" (the sampler's definition): a live, not stopped proxy process of this deployment whose
latest `event=phase` line says it accepts (serving, or the old side's spawning / handshake /
wait_ready / handover: it accepts until just before RELEASED), and the moment is good when exactly
one such process exists and the pidfile names it. The new generation logs `phase=serving` a few
ms before the old one logs `phase=released` (both after the old stopped accepting), so two
serving generations count only when it lasts longer than --confirm-ms; shorter overlaps are
listed separately as log-order blips. Zero-serving samples (the pidfile switch, a stop) are
counted apart from two-serving ones.

Faults (each at a random step of the upgrade, chosen from the old generation's phase lines):
kill9_new, sigstop_new (held past upgrade_timeout, then SIGCONT), bad_config, broken_module (a
`proxy/__init__.py` raising ImportError in the proxy's cwd), garbage_peer (junk on the takeover
socket while idle and during the handover), usr2_storm (5 SIGUSR2 in 100 ms), sigterm_handover
(a graceful stop: errors during it are expected and counted apart; a fresh proxy is started
after it), kill9_old_released (only requests the old generation still held may fail).

`--workers N` runs the proxy with `[proxy] workers = N`: every generation is a supervisor and N
workers. Every fault kind applies; "the new/old generation" is the supervisor (and, for
kill9_old_released, its workers too): see bench/chaosfaults.py. A worker that outlives its
generation (past drain_timeout) counts as a stray.

    python bench/chaos.py --workers 2 --upgrades 20 --seed 11
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import json
import os
import random
import shutil
import time

from bench.chaosdeploy import Deployment
from bench.chaosfaults import KINDS, STEPS, run_upgrade
from bench.chaosoutcome import Record
from bench.chaosreport import analyse, report
from bench.common import become_subreaper, machine_note, say


def schedule(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, step) per upgrade: a fault with probability --fault-rate; --faults-all puts every
    kind once at a random position first (needs --upgrades >= the number of kinds)."""
    kinds = args.kinds.split(",") if args.kinds else KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    plan: list[tuple[str, str]] = []
    for _ in range(args.upgrades):
        if rng.random() < args.fault_rate:
            kind = rng.choice(kinds)
            plan.append((kind, rng.choice(STEPS[kind])))
        else:
            plan.append(("none", ""))
    if args.faults_all:
        if args.upgrades < len(kinds):
            raise SystemExit(f"--faults-all needs --upgrades >= {len(kinds)}")
        slots = rng.sample(range(args.upgrades), len(kinds))
        for slot, kind in zip(slots, kinds, strict=True):
            plan[slot] = (kind, rng.choice(STEPS[kind]))
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--upgrades", type=int, default=100, help="upgrades to run (100)")
    ap.add_argument("--seed", type=int, default=1, help="schedule and load seed (1)")
    ap.add_argument("--fault-rate", type=float, default=0.33,
                    help="share of upgrades with a fault (0.33)")
    ap.add_argument("--faults-all", action="store_true",
                    help="every fault kind at least once (at random positions)")
    ap.add_argument("--kinds", metavar="K,K", help="only these fault kinds (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write the machine-readable result here")
    ap.add_argument("--streams", type=int, default=8, help="sequence-checked tcp streams (8)")
    ap.add_argument("--http-clients", type=int, default=4, help="http keep-alive clients (4)")
    ap.add_argument("--slow-ms", default="1000-3000",
                    help="the slow endpoint's delay range, ms (1000-3000)")
    ap.add_argument("--upgrade-timeout", type=float, default=3.0,
                    help="the proxy's upgrade_timeout, s (3)")
    ap.add_argument("--drain-timeout", type=float, default=5.0,
                    help="the proxy's drain_timeout, s (5)")
    ap.add_argument("--client-timeout", type=float, default=15.0,
                    help="an op without its answer for this long is an error, s (15)")
    ap.add_argument("--sample-ms", type=float, default=25.0, help="sampler period (25)")
    ap.add_argument("--confirm-ms", type=float, default=250.0,
                    help="two serving generations count when seen this long (250)")
    ap.add_argument("--settle", type=float, default=0.3, help="pause between upgrades, s (0.3)")
    ap.add_argument("--keep-log", metavar="PATH", help="copy the proxy's log here at the end")
    ap.add_argument("--workers", type=int, default=1, help="the proxy's [proxy] workers (1)")
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="stop scheduling upgrades after this long (3600)")
    args = ap.parse_args()
    become_subreaper()
    say(machine_note())
    rng = random.Random(args.seed)
    plan = schedule(args, rng)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"chaos-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    d = Deployment(args, workdir)
    records: list[Record] = []
    interrupted = ""
    try:
        d.start()
        for i, (kind, step) in enumerate(plan):
            if time.time() - d.t_start > args.max_seconds:
                interrupted = f"stopped after {i} upgrades: --max-seconds {args.max_seconds:g}"
                break
            r = Record(i, kind, step)
            records.append(r)
            if not d.serving_pid():
                d.px.restart()
                r.problems.append("nothing served before this upgrade; started a fresh proxy")
            run_upgrade(d, r, rng)
            say(f"upgrade {i + 1}/{len(plan)} {kind}{'@' + step if step else ''}: {r.outcome}"
                f"{' (landed in ' + r.landed + ')' if r.landed and r.landed != step else ''}"
                f" pid {r.old_pid} -> {d.serving_pid()}"
                f"{'; ' + '; '.join(r.notes) if r.notes else ''}")
            time.sleep(args.settle)
    except (RuntimeError, OSError) as exc:
        interrupted = f"aborted: {type(exc).__name__}: {exc}"
        say(interrupted)
    finally:
        d.stop()
    if d.load is None or d.sampler is None:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"chaos soak did not start: {interrupted}")
        return 2
    rows, problems, result = analyse(d, records)
    if interrupted:
        problems.insert(0, interrupted)
        result["problems"] = problems
    result["interrupted"] = interrupted
    report(rows, problems, result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(workdir, ignore_errors=True)
    bad = sum(x.errors for x in rows) or any(x.max_serving > 1 for x in rows) or interrupted
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
