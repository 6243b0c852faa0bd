"""tcp-mode throughput: our proxy against a direct connection and HAProxy (mode tcp), same run.

(a) request/response rate: `wrk` (HTTP/1.1 keep-alive) through a tcp listener to nginx answering
    a 6-byte body, against: nginx directly, our proxy (mode tcp), HAProxy (mode tcp, 1 thread).
(b) bulk: a sender pushes `--bulk-mib` (1 GiB) through in one connection (sendfile from a
    memfd); a sink discards it (splice to /dev/null) and answers the byte count on EOF. MB/s
    = bytes / (connect .. count received). Against: the sink directly, our proxy (splice on,
    and splice off), HAProxy copying, HAProxy with `option splice-auto`, and HAProxy with
    splicing forced (`option splice-request` + `option splice-response`). HAProxy gets
    `tune.pipesize` 1 MiB, the size of our proxy's splice pipes. (HAProxy 2.6's splice-auto
    hardly ever splices on loopback here; forced splicing is its real zero-copy number.)

Every process runs on 127.0.0.1 and is stopped by pid; every run has a deadline. Absolute
numbers depend on the machine (all of wrk, nginx, the middlebox and the sink share its cores:
see `nproc`); the ratios, measured in the same run, are the point.

`--workers 1 2` runs one proxy per worker count (`[proxy] workers = N`), all measured in the
same run under the same load, and adds a scaling table: req/s with each N and its ratio to 1
worker (goal: 2 workers >= 1.6x), the proxy's CPU summed over the supervisor and every worker,
and the CPU per request of the workers (must not grow with N). `--rounds R` measures every
request/response target R times, round-robin (the tables give medians and ranges).

    python bench/tcp.py --quick            # ~1 min
    python bench/tcp.py --duration 10      # default: 10 s per wrk run, 3 bulk runs each
    python bench/tcp.py --workers 1 2 --rounds 2 --skip bulk
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.common import (
    COUNT,
    LOOPBACK,
    CpuSplit,
    HAProxy,
    Helper,
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

MIB = 1 << 20
CHUNK = 64 * MIB  # the memfd the sender sendfile()s from, over and over


@dataclass
class Target:
    label: str
    port: int
    pid: int = 0  # the middlebox, for its CPU use (0: none)
    proxy: ProxyProcess | None = None  # ours: its CPU is the supervisor's + every worker's
    workers: int = 0  # ours: its worker count


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_pct: float
    requests: int = 0
    wall_s: float = 0.0
    cpu: CpuSplit | None = None


@dataclass
class BulkResult:
    mbps: float  # 10^6 bytes per second
    seconds: float
    cpu_pct: float


# ---- (a) wrk -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(t: Target, duration: float, conns: int, threads: int) -> WrkResult:
    wrk = shutil.which("wrk")
    assert wrk is not None
    cmd = [wrk, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
           f"http://{LOOPBACK}:{t.port}/"]
    meter = t.proxy.meter() if t.proxy is not None else None
    if meter is not None:
        meter.start()
    cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    wall = time.monotonic() - t0
    split = meter.stop() if meter is not None else None
    if split is not None:
        cpu = split.total_s / wall * 100
    else:
        cpu = (cpu_seconds(t.pid) - cpu0) / wall * 100 if t.pid else float("nan")
    if out.returncode != 0:
        raise RuntimeError(f"wrk against {t.label} failed: {out.stderr.strip() or out.stdout}")
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not rps or not total:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    return WrkResult(float(rps.group(1)), _ms(p50.group(1)) if p50 else float("nan"),
                     _ms(p99.group(1)) if p99 else float("nan"), errors, cpu,
                     int(total.group(1)), wall, split)


# ---- (b) bulk ------------------------------------------------------------------------------

def make_source() -> int:
    """A memfd of CHUNK bytes (not all zero, not that it matters to TCP)."""
    fd = os.memfd_create("bench-bulk")
    block = bytes(range(256)) * (MIB // 256)
    for _ in range(CHUNK // MIB):
        os.write(fd, block)
    return fd


def run_bulk(t: Target, total: int, src: int, timeout: float) -> BulkResult:
    meter = t.proxy.meter() if t.proxy is not None else None
    if meter is not None:
        meter.start()
    cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, t.port), timeout=30.0) as s, \
            os.fdopen(os.dup(src), "rb") as f:
        sent = 0
        while sent < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bulk through {t.label}: not done within {timeout}s")
            n = min(CHUNK, total - sent)
            s.sendfile(f, 0, n)
            sent += n
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < COUNT.size:
            chunk = s.recv(COUNT.size - len(got))
            if not chunk:
                raise RuntimeError(f"bulk through {t.label}: closed before the byte count")
            got += chunk
    wall = time.monotonic() - t0
    (count,) = COUNT.unpack(got)
    if count != total:
        raise RuntimeError(f"bulk through {t.label}: the sink got {count} bytes, sent {total}")
    if meter is not None:
        cpu = meter.stop().total_s / wall * 100
    else:
        cpu = (cpu_seconds(t.pid) - cpu0) / wall * 100 if t.pid else float("nan")
    return BulkResult(total / wall / 1e6, wall, cpu)


# ---- main ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    ap.add_argument("--quick", action="store_true",
                    help="3 s wrk runs, one bulk transfer per target")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    ap.add_argument("--bulk-mib", type=int, default=1024, help="MiB per bulk transfer (1024)")
    ap.add_argument("--repeat", type=int, default=3, help="bulk transfers per target; the median "
                    "is shown (3; 1 with --quick)")
    ap.add_argument("--skip", choices=["rr", "bulk"], action="append", default=[],
                    help="skip a part (repeatable)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], metavar="N",
                    help="our proxy with each of these worker counts, same run (1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="request/response: measure every target N times, round-robin (1)")
    args = ap.parse_args()
    if any(n < 1 for n in args.workers):
        raise SystemExit("--workers: counts >= 1")
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.repeat = 1
    ensure_tools("wrk", "nginx", "haproxy")
    become_subreaper()
    say(f"before: {machine_note()}")
    nginx = Nginx()
    sink = Helper("sink")
    with started(nginx, sink):
        proxies = [ProxyProcess(
            [{"name": "rr", "upstream": "nginx"},
             {"name": "bulk", "upstream": "sink"},
             {"name": "bulk_copy", "upstream": "sink", "splice": False}],
            {"nginx": {"servers": [f"{LOOPBACK}:{nginx.port}"]},
             "sink": {"servers": [f"{LOOPBACK}:{sink.port}"]}},
            metrics=False, workers=n) for n in args.workers]

        def tag(n: int) -> str:
            return f", {n}w" if args.workers != [1] else ""

        haproxy = HAProxy({"rr": (f"{LOOPBACK}:{nginx.port}", ""),
                           "bulk": (f"{LOOPBACK}:{sink.port}", ""),
                           "bulk_auto": (f"{LOOPBACK}:{sink.port}", "auto"),
                           "bulk_force": (f"{LOOPBACK}:{sink.port}", "force")})
        with started(*proxies, haproxy):
            for proxy in proxies:
                say(f"proxy workers={proxy.workers} pid={proxy.serving_pid()} "
                    f"worker pids={sorted(proxy.worker_pids().values())} {proxy.ports}")
            say(f"nproc={os.cpu_count()} nginx={nginx.port} sink={sink.port} "
                f"haproxy pid={haproxy.pid} {haproxy.ports}")
            first = proxies[0]
            if "rr" not in args.skip:
                rr_part(args, [Target("direct (nginx)", nginx.port),
                               *[Target(f"proxy tcp{tag(p.workers)}", p.ports["rr"],
                                        p.serving_pid() or 0, p, p.workers) for p in proxies],
                               Target("HAProxy tcp", haproxy.ports["rr"], haproxy.pid)])
            if "bulk" not in args.skip:
                bulk_part(args, [Target("direct (sink)", sink.port),
                                 *[Target(f"proxy tcp, splice{tag(p.workers)}", p.ports["bulk"],
                                          p.serving_pid() or 0, p, p.workers) for p in proxies],
                                 Target(f"proxy tcp, no splice{tag(first.workers)}",
                                        first.ports["bulk_copy"], first.serving_pid() or 0, first,
                                        first.workers),
                                 Target("HAProxy tcp", haproxy.ports["bulk"], haproxy.pid),
                                 Target("HAProxy tcp, splice-auto", haproxy.ports["bulk_auto"],
                                        haproxy.pid),
                                 Target("HAProxy tcp, splice forced", haproxy.ports["bulk_force"],
                                        haproxy.pid)])
    print(f"\n{machine_note()} at the end (wrk, nginx, the sink, the middlebox and this sender "
          f"share those CPUs)")
    return 0


def rr_part(args: argparse.Namespace, targets: list[Target]) -> None:
    results: list[tuple[Target, WrkResult]] = []
    for rnd in range(args.rounds):
        for t in targets:
            tag = f" #{rnd + 1}" if args.rounds > 1 else ""
            say(f"wrk warm-up: {t.label}{tag}")
            run_wrk(t, 1.0, args.connections, args.threads)
            say(f"wrk {args.duration:g}s: {t.label}{tag}")
            results.append((t, run_wrk(t, args.duration, args.connections, args.threads)))
    rows = []
    for k, (t, r) in enumerate(results):
        base = k - k % len(targets)  # this round's direct and HAProxy
        direct, hap = results[base][1].rps, results[base + len(targets) - 1][1].rps
        rows.append([t.label, fmt(r.rps, 0), fmt(r.p50_ms, 2), fmt(r.p99_ms, 2),
                     fmt(r.cpu_pct, 0), ratio(r.rps, direct), ratio(r.rps, hap), r.errors])
    print_table(f"(a) request/response: wrk -t{args.threads} -c{args.connections} "
                f"-d{max(1, round(args.duration))}s, HTTP keep-alive through tcp mode, "
                f"nginx 6-byte body; rows in the order run ({args.rounds} round(s)); ratios "
                f"to the same round's direct and HAProxy",
                ["target", "req/s", "p50 ms", "p99 ms", "middlebox CPU%", "vs direct",
                 "vs HAProxy", "errors"], rows)
    points = [ScalePoint(t.workers, r.rps, r.requests, r.cpu, r.wall_s, k // len(targets))
              for k, (t, r) in enumerate(results) if t.proxy is not None and r.cpu is not None]
    if len({p.workers for p in points}) > 1:
        print_scaling(f"(a) worker scaling, tcp mode: the same load (wrk -t{args.threads} "
                      f"-c{args.connections}), one proxy per worker count, same run "
                      f"(nproc={os.cpu_count()}, shared with wrk and nginx)", points)


def bulk_part(args: argparse.Namespace, targets: list[Target]) -> None:
    total = args.bulk_mib * MIB
    src = make_source()
    results: dict[str, list[BulkResult]] = {t.label: [] for t in targets}
    try:
        for i in range(args.repeat):
            order = targets if i % 2 == 0 else list(reversed(targets))
            for t in order:
                say(f"bulk {args.bulk_mib} MiB #{i + 1}: {t.label}")
                results[t.label].append(run_bulk(t, total, src, timeout=300.0))
    finally:
        os.close(src)

    def med(label: str) -> BulkResult:
        rs = sorted(results[label], key=lambda r: r.mbps)
        return rs[len(rs) // 2]

    direct = med(targets[0].label).mbps
    hap = med("HAProxy tcp").mbps
    hap_splice = med("HAProxy tcp, splice forced").mbps
    rows = []
    for t in targets:
        r = med(t.label)
        spread = [x.mbps for x in results[t.label]]
        rows.append([t.label, fmt(r.mbps, 0), fmt(r.seconds, 2),
                     fmt(statistics.pstdev(spread) if len(spread) > 1 else float("nan"), 0),
                     fmt(r.cpu_pct, 0), ratio(r.mbps, direct), ratio(r.mbps, hap),
                     ratio(r.mbps, hap_splice)])
    print_table(f"(b) bulk: {args.bulk_mib} MiB in one connection, sendfile -> middlebox -> "
                f"splice to /dev/null (median of {args.repeat})",
                ["target", "MB/s", "seconds", "stdev MB/s", "middlebox CPU%", "vs direct",
                 "vs HAProxy", "vs HAProxy splice forced"], rows)


if __name__ == "__main__":
    sys.exit(main())
