"""http-mode rate: our proxy (mode http) against nginx directly and HAProxy (mode http), same run.

wrk (HTTP/1.1 keep-alive, `-t2 -c50` by default, `--latency`) asks for `/`, a 6-byte body:
  (a) direct: nginx (one process, `return 200`, no access log);
  (b) our proxy, one listener in mode http (`access_log = false`, upstream pool of 2 x -c);
  (c) HAProxy 2.x in mode http, one process, `nbthread 1` by default (our proxy is one Python
      thread), `option http-keep-alive`, `http-reuse always` (keep-alive to nginx too).
Each target gets a 1 s warm-up then `--duration` seconds. The table gives req/s, p50/p99
latency, errors, the middlebox's CPU use (100% = one core) and ratios vs direct and vs HAProxy.

NOTE: everything shares this machine's cores (`nproc`, 2 here): wrk's threads, nginx, and the
proxy under test all compete; absolute rates are low and the ratios, measured in the same run,
are the point.

`--profile` then samples our proxy with py-spy (`py-spy record --format raw`, 100 Hz) during
another wrk run of the same load and prints the top functions by self and by total samples
(the sampling itself costs the proxy a little throughput).

    python bench/http.py --quick              # ~3 s per target
    python bench/http.py                      # 10 s per target
    python bench/http.py --profile            # + py-spy profile of our proxy under the load
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    LOOPBACK,
    Nginx,
    become_subreaper,
    cpu_seconds,
    ensure_tools,
    fmt,
    print_table,
    ratio,
    say,
    started,
)
from bench.httpcommon import HAProxyHttp, WrkResult, WrkRun, http_proxy, load_note, proxy_pid, run_wrk


@dataclass
class Row:
    label: str
    res: WrkResult
    cpu_pct: float


def measure(label: str, port: int, pid: int, args: argparse.Namespace) -> Row:
    say(f"warm-up 1s: {label}")
    run_wrk(port, 1.0, args.connections, args.threads)
    say(f"wrk -t{args.threads} -c{args.connections} {args.duration:g}s: {label}")
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    res = run_wrk(port, args.duration, args.connections, args.threads)
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - cpu0) / wall * 100 if pid else float("nan")
    return Row(label, res, cpu)


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
    args = ap.parse_args()
    if args.quick:
        args.duration = 3.0
    ensure_tools("wrk", "nginx", "haproxy")
    become_subreaper()
    note = load_note()
    say(note)

    backend = Nginx()
    rows: list[Row] = []
    with started(backend):
        ours = http_proxy(backend.port, args.connections)
        with started(ours):
            rows.append(measure("direct (nginx)", backend.port, backend.pid, args))
            rows.append(measure("our proxy (mode http)", ours.ports["web"], proxy_pid(ours), args))
            haproxy = HAProxyHttp(f"{LOOPBACK}:{backend.port}", nbthread=args.haproxy_threads)
            with started(haproxy):
                rows.append(measure(f"HAProxy (mode http, nbthread {args.haproxy_threads})",
                                    haproxy.port, haproxy.pid, args))
            direct, mine, hap = rows[0].res, rows[1].res, rows[2].res
            print_table(
                f"HTTP/1.1 keep-alive, 6-byte body: wrk -t{args.threads} "
                f"-c{args.connections} -d{max(1, round(args.duration))}s --latency "
                f"(nproc={_nproc()}, shared by wrk, nginx and the proxy)",
                ["target", "req/s", "p50", "p99", "errors", "CPU", "vs direct", "vs HAProxy"],
                [[r.label, fmt(r.res.rps, 0), f"{r.res.p50_ms:.2f} ms", f"{r.res.p99_ms:.2f} ms",
                  r.res.errors, "-" if r.cpu_pct != r.cpu_pct else f"{r.cpu_pct:.0f}%",
                  ratio(r.res.rps, direct.rps), ratio(r.res.rps, hap.rps)] for r in rows])
            print(note)
            goal = mine.rps >= 0.5 * hap.rps
            print(f"\ngoal (our proxy >= 0.5x HAProxy's rate): {ratio(mine.rps, hap.rps)} -> "
                  f"{'met' if goal else 'NOT met'}; HAProxy/direct = {ratio(hap.rps, direct.rps)}")
            if args.profile:
                profile(ours.ports["web"], proxy_pid(ours), args)
    return 0


def _nproc() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
