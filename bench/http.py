"""http-mode rate: our proxy (mode http) against nginx directly and HAProxy (mode http), same run.

wrk (HTTP/1.1 keep-alive, `-t2 -c50` by default, `--latency`) asks for `/`, a 6-byte body:
  (a) direct: nginx (one process, `return 200`, no access log);
  (b) our proxy, one listener in mode http (`access_log = false`, upstream pool of 2 x -c);
  (c) HAProxy 2.x in mode http, one process, `nbthread 1` by default (our proxy is one Python
      thread), `option http-keep-alive`, `http-reuse always` (keep-alive to nginx too).
Each target gets a 1 s warm-up then `--duration` seconds. The table gives req/s, p50/p99
latency, errors, the middlebox's CPU use (100% = one core), its CPU per request (utime + stime
of its process and children from /proc over the run, divided by the requests wrk completed: a
figure that does not depend on how busy the machine is, unlike req/s) and ratios vs direct and
vs HAProxy. `--rounds N` measures every target N times, round-robin, and adds a table of the
CPU per request over the rounds (min, median, max).

`--also LABEL=PYTHON[:ROOT]` adds another instance of our proxy run by another interpreter
(e.g. a venv with h11-mypyc) and/or from another source tree (a baseline checkout), measured
in the same rounds; each of ours is labelled with the h11 build it imports.

NOTE: everything shares this machine's cores (`nproc`, 2 here): wrk's threads, nginx, and the
proxy under test all compete; absolute rates are low and the ratios, measured in the same run,
are the point.

`--profile` then samples our proxy with py-spy (`py-spy record --format raw`, 100 Hz) during
another wrk run of the same load and prints the top functions by self and by total samples
(the sampling itself costs the proxy a little throughput). py-spy counts a thread that is
runnable but waiting for a CPU as busy, and a loopback `send` wakes the peer, which (most likely)
takes the CPU on the way out of the call: `send` shows more samples than its CPU cost (the table's
"of it sys" column is the kernel's real share: ~20% for our proxy here, against ~30% of samples).

    python bench/http.py --quick              # ~3 s per target
    python bench/http.py                      # 10 s per target
    python bench/http.py --profile            # + py-spy profile of our proxy under the load
    python bench/http.py --rounds 3 --also "mypyc=/tmp/venv-mypyc/bin/python"
    python bench/http.py --workers 1 2 --rounds 2   # + worker scaling table

`--workers 1 2` runs each of our proxies once per worker count (`[proxy] workers = N`), all in
the same rounds under the same load, and adds a scaling table: req/s with each N and its ratio
to 1 worker (goal: 2 workers >= 1.6x), the CPU of the supervisor and every worker together, and
the workers' CPU per request (must not grow with N). Our proxy's CPU is always that sum.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import collections
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    LOOPBACK,
    ROOT,
    CpuSplit,
    Nginx,
    ProxyProcess,
    ScalePoint,
    become_subreaper,
    cpu_seconds,
    ensure_tools,
    fmt,
    machine_note,
    print_scaling,
    print_table,
    ratio,
    say,
    started,
)
from bench.httpcommon import (
    HAProxyHttp,
    WrkResult,
    WrkRun,
    children,
    http_proxy,
    load_note,
    proxy_pid,
    run_wrk,
)


@dataclass
class Row:
    label: str
    res: WrkResult
    cpu_pct: float  # % of one core over the run
    cpu_s: float  # CPU seconds (utime + stime) over the run
    sys_s: float  # of which in the kernel (stime): syscalls, and loopback TCP work done in them
    wall_s: float = 0.0
    cpu: CpuSplit | None = None  # ours: supervisor and workers apart
    workers: int = 0  # ours: the worker count
    variant: str = ""  # ours: the --also label ("ours" for this tree)

    @property
    def us_per_req(self) -> float:
        return self.cpu_s / self.res.requests * 1e6 if self.res.requests else float("nan")


def _cpu(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of `pid` so far, in seconds ((0, 0) once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU, kernel CPU) seconds so far of `pid` and its live children (workers, if any)."""
    times = [_cpu(p) for p in (pid, *children(pid))]
    return sum(t for t, _ in times), sum(s for _, s in times)


@dataclass
class Target:
    label: str
    port: int
    pid: int
    proxy: ProxyProcess | None = None  # ours
    variant: str = ""


def measure(t: Target, args: argparse.Namespace) -> Row:
    say(f"warm-up 1s: {t.label}")
    run_wrk(t.port, 1.0, args.connections, args.threads)
    say(f"wrk -t{args.threads} -c{args.connections} {args.duration:g}s: {t.label}")
    meter = t.proxy.meter() if t.proxy is not None else None
    if meter is not None:
        meter.start()
    cpu0, sys0 = tree_cpu(t.pid)
    t0 = time.monotonic()
    res = run_wrk(t.port, args.duration, args.connections, args.threads)
    wall = time.monotonic() - t0
    if meter is not None and t.proxy is not None:
        split = meter.stop()
        return Row(t.label, res, split.total_s / wall * 100, split.total_s, split.sys_s, wall,
                   split, t.proxy.workers, t.variant)
    cpu1, sys1 = tree_cpu(t.pid)
    return Row(t.label, res, (cpu1 - cpu0) / wall * 100, cpu1 - cpu0, sys1 - sys0, wall)


def h11_build(python: str, root: Path) -> str:
    """Which h11 our proxy imports when run by `python` from `root` (`h11 0.16.0 (pure)`...)."""
    code = ("import importlib.metadata as md, proxy.http as m; n = m.h11.__name__; "
            "print(n.replace('_', '-'), md.version(n.replace('_', '-')), "
            "'(compiled)' if m.h11._connection.__file__.endswith('.so') else '(pure)')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    return out.stdout.strip() or f"h11 unknown: {out.stderr.strip()[-200:]}"


# ---- py-spy ------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(frame: str) -> tuple[str, str, str]:
    """`func (path/to/pkg/file.py:12)` -> (`func (pkg/file.py)`, `pkg/file.py:12 func`, path)."""
    m = _FRAME.match(frame)
    if not m:
        return frame, frame, ""
    short = "/".join(Path(m.group("file")).parts[-2:])
    line = f"{short}:{m.group('line')}" if m.group("line") else short
    return f"{m.group('func')} ({short})", f"{line} {m.group('func')}", m.group("file")


AREAS = (("/h11/", "h11 (HTTP parsing/framing)"), ("/trio/", "trio (scheduler, cancel scopes)"),
         ("/proxy/", "proxy/ (our code)"), ("prometheus_client", "prometheus_client (metrics)"))


def _area(frames: list[tuple[str, str, str]]) -> str:
    """Where a sample's time goes: a syscall (top frame in libc), else the package of the
    innermost Python frame (C code called from Python counts for its caller)."""
    if frames[-1][2].startswith("libc"):
        return "syscalls (libc: send, recv, epoll...)"
    for _, _, path in reversed(frames):
        if path.endswith(".py") or ".py" in path:
            for needle, area in AREAS:
                if needle in path or path.startswith(needle.strip("/") + "/"):
                    return area
            return "stdlib and other Python"
    return "other native"


@dataclass
class Profile:
    samples: int
    own: list[tuple[str, int]]  # functions by self samples (top of the stack)
    total: list[tuple[str, int]]  # functions by samples anywhere on the stack
    lines: list[tuple[str, int]]  # proxy/ source lines by samples anywhere on the stack
    areas: list[tuple[str, int]]  # self samples by package (see _area)


def summarize_raw(text: str, top: int) -> Profile:
    """py-spy raw (collapsed) stacks, `frame;frame;... count` per line, outermost first."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    n = 0
    for row in text.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_frame(f) for f in stack.split(";")  # no thread names, no bare addresses
                  if not f.startswith(("process ", "thread ", "0x"))]
        if not frames:
            continue
        n += c
        own[frames[-1][0]] += c
        areas[_area(frames)] += c
        for f in {f for f, _, _ in frames}:
            total[f] += c
        for ln in {ln for _, ln, _ in frames if ln.startswith("proxy/")}:
            lines[ln] += c
    # Frames on every stack (main, trio's run loop, ...) say nothing: leave them out.
    return Profile(n, own.most_common(top),
                   [(f, c) for f, c in total.most_common() if c < n][:top],
                   [(f, c) for f, c in lines.most_common() if c < n][:top], areas.most_common())


def profile(port: int, pid: int, args: argparse.Namespace) -> Profile:
    """Sample `pid` with py-spy (native frames, so time in syscalls shows as e.g. `send (libc)`)
    during a wrk run of the benchmark's load; print and return the summary."""
    ensure_py_spy()
    pyspy = shutil.which("py-spy")
    assert pyspy is not None
    seconds = max(3, round(args.duration))
    out = Path(tempfile.mkdtemp(prefix="bench-pyspy-")) / "proxy.raw"
    say(f"py-spy record -d {seconds} --native --pid {pid} under wrk -t{args.threads} "
        f"-c{args.connections}")
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    with WrkRun(port, seconds + 2, args.connections, args.threads) as load:
        time.sleep(1.0)
        cmd = [pyspy, "record", "--pid", str(pid), "-d", str(seconds), "-r", "100", "--native",
               "--format", "raw", "-o", str(out)]
        rec = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
        res = load.result()
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
    if rec.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({rec.returncode}): {rec.stderr.strip()[-2000:]}")
    prof = summarize_raw(out.read_text(), args.top)
    n = prof.samples
    print(f"\npy-spy record --native -r 100 -d {seconds} --pid {pid}: {n} samples while busy "
          f"(idle waits in epoll are not sampled); proxy CPU {cpu:.0f}% of a core; wrk meanwhile "
          f"{fmt(res.rps, 0)} req/s (sampling slows the proxy); raw stacks: {out}")
    pct = [["function (file)", "samples", "%"], ["file:line function", "samples", "%"]]
    print_table("where the time goes (self samples by package of the innermost Python frame)",
                ["area", "samples", "%"], [[f, c, f"{100 * c / n:.1f}%"] for f, c in prof.areas])
    print_table("hot spots by self samples (on top of the stack; C functions are native frames)",
                pct[0], [[f, c, f"{100 * c / n:.1f}%"] for f, c in prof.own])
    print_table("hot spots by total samples (anywhere on the stack)",
                pct[0], [[f, c, f"{100 * c / n:.1f}%"] for f, c in prof.total])
    print_table("proxy/ source lines by total samples",
                pct[1], [[f, c, f"{100 * c / n:.1f}%"] for f, c in prof.lines])
    return prof


def ensure_py_spy() -> None:
    if shutil.which("py-spy"):
        return
    say("installing py-spy with pip")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], timeout=600, check=True)
    if not shutil.which("py-spy"):
        raise SystemExit("py-spy not found after pip install py-spy")


# ---- main --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    ap.add_argument("--quick", action="store_true", help="3 s per wrk run")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    ap.add_argument("--haproxy-threads", type=int, default=1, help="HAProxy nbthread (1)")
    ap.add_argument("--profile", action="store_true", help="then profile our proxy with py-spy")
    ap.add_argument("--top", type=int, default=20, help="rows of each py-spy table (20)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every target N times (1)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=PYTHON[:ROOT]",
                    help="another instance of our proxy: this interpreter, this source tree")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], metavar="N",
                    help="each of our proxies with each of these worker counts (1)")
    args = ap.parse_args()
    if any(n < 1 for n in args.workers):
        raise SystemExit("--workers: counts >= 1")
    if args.quick:
        args.duration = 3.0
    ensure_tools("wrk", "nginx", "haproxy")
    become_subreaper()
    note = load_note()
    say(note)

    variants = [("ours", sys.executable, ROOT)]
    for spec in args.also:
        label, _, rest = spec.partition("=")
        python, _, root = rest.partition(":")
        variants.append((label, python or sys.executable, Path(root) if root else ROOT))

    backend = Nginx()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(started(backend))
        targets = [Target("direct (nginx)", backend.port, backend.pid)]
        first = None
        for label, python, root in variants:
            build = h11_build(python, root)
            for n in args.workers:
                proxy = http_proxy(backend.port, args.connections, python=python, root=root,
                                   workers=n)
                stack.enter_context(started(proxy))
                first = first or proxy
                say(f"{label} workers={n}: pid {proxy_pid(proxy)}, worker pids "
                    f"{sorted(proxy.worker_pids().values())}")
                wtag = f", {n}w" if args.workers != [1] else ""
                targets.append(Target(f"{label}: proxy, {build}{wtag}", proxy.ports["web"],
                                      proxy_pid(proxy), proxy, label))
        haproxy = HAProxyHttp(f"{LOOPBACK}:{backend.port}", nbthread=args.haproxy_threads)
        stack.enter_context(started(haproxy))
        hap_label = f"HAProxy (mode http, nbthread {args.haproxy_threads})"
        targets.append(Target(hap_label, haproxy.port, haproxy.pid))
        for rnd in range(args.rounds):
            for t in targets:
                tag = f" #{rnd + 1}" if args.rounds > 1 else ""
                rows.append(measure(Target(t.label + tag, t.port, t.pid, t.proxy, t.variant),
                                    args))
                rows[-1].label = t.label  # the round number only in the progress lines
        direct, hap = rows[0].res, rows[len(targets) - 1].res
        print_table(
            f"HTTP/1.1 keep-alive, 6-byte body: wrk -t{args.threads} "
            f"-c{args.connections} -d{max(1, round(args.duration))}s --latency "
            f"(nproc={_nproc()}, shared by wrk, nginx and the proxy); rows in the order run",
            ["target", "req/s", "p50", "p99", "errors", "CPU", "CPU/req", "of it sys",
             "vs direct", "vs HAProxy"],
            [[r.label, fmt(r.res.rps, 0), f"{r.res.p50_ms:.2f} ms", f"{r.res.p99_ms:.2f} ms",
              r.res.errors, "-" if r.cpu_pct != r.cpu_pct else f"{r.cpu_pct:.0f}%",
              f"{fmt(r.us_per_req, 1)} us",
              f"{100 * r.sys_s / r.cpu_s:.0f}%" if r.cpu_s else "-", ratio(r.res.rps, direct.rps),
              ratio(r.res.rps, hap.rps)] for r in rows])
        per: dict[str, list[float]] = {}
        for r in rows:
            per.setdefault(r.label, []).append(r.us_per_req)
        med = {label: statistics.median(v) for label, v in per.items()}
        ours = targets[1].label
        print_table(
            f"CPU per request of the process serving it (utime+stime / requests), "
            f"{args.rounds} round(s); ratios of medians",
            ["target", "min", "median", "max", "vs ours", "vs HAProxy"],
            [[label, f"{fmt(min(v), 1)} us", f"{fmt(med[label], 1)} us",
              f"{fmt(max(v), 1)} us", ratio(med[label], med[ours]),
              ratio(med[label], med[hap_label])] for label, v in per.items()])
        print(note)
        print(f"after: {machine_note()}")
        mine = [r for r in rows if r.label == ours]
        rate = statistics.median(r.res.rps for r in mine)
        print(f"\ngoal (our proxy >= 0.5x HAProxy's rate): {ratio(rate, hap.rps)} -> "
              f"{'met' if rate >= 0.5 * hap.rps else 'NOT met'}; "
              f"HAProxy/direct = {ratio(hap.rps, direct.rps)}")
        print(f"goal (<= 200 us of proxy CPU per request): median {fmt(med[ours], 1)} us -> "
              f"{'met' if med[ours] <= 200 else 'NOT met'}")
        for label, _, _ in variants:
            points = [ScalePoint(r.workers, r.res.rps, r.res.requests, r.cpu, r.wall_s,
                                 k // len(targets))
                      for k, r in enumerate(rows) if r.variant == label and r.cpu is not None]
            if len({p.workers for p in points}) > 1:
                print_scaling(f"worker scaling, http mode ({label}): the same load (wrk "
                              f"-t{args.threads} -c{args.connections}), one proxy per worker "
                              f"count, same rounds (nproc={_nproc()}, shared with wrk and nginx)",
                              points)
        if args.profile:
            assert first is not None
            profile(first.ports["web"], proxy_pid(first), args)
    return 0


def _nproc() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
