"""Hot upgrade under load: N long-lived echo streams through the proxy (tcp mode), K upgrades.

Setup: an epoll echo server (`common.py echo`), the proxy (one tcp listener in front of it),
and a client process (`upgrade.py _client`, one epoll loop, no GIL shared with anything else)
holding N connections. Each stream sends a burst of 1-3 sequence-numbered 16-byte lines
(`SSSSSS QQQQQQQQ\\n`: stream id, sequence number), waits for exactly those bytes back, then
waits for its next slot: streams are paced so that all together send `--rate` bursts per second,
with their phases spread evenly. A reply that differs from what was sent is an error (classified
as a gap, a duplicate/reorder, or another stream's bytes), as is an EOF, a reset, extra bytes,
or no reply within `--timeout`.

Then K times: SIGUSR2 to the pid in the pidfile; poll until the pidfile names another process
(SIGUSR2 -> serving) and the old pid is gone (SIGUSR2 -> old exit); read the old generation's
`event=handed_over moved=N handover_ms=X` line (pausing, sending and getting ACKs
for the N pairs); wait `--settle` seconds.

Stall: for each upgrade, every burst in flight at some point of [SIGUSR2, old exit] counts;
its echo round-trip time is how long that stream could not make progress. Per stream the
worst of those; the table shows p50 / p99 / max across the streams that had one (the column
`sampled`). With paced streams the "max gap between consecutive replies" is the pacing
interval plus exactly this round-trip, so the round-trip is the part the upgrade is
responsible for; the baseline columns give the same round-trip before any upgrade.

N: by default 1000 and 10000. The proxy needs 2 fds per connection (client + upstream), so N
is capped at (RLIMIT_NOFILE ceiling - 200) / 2 when the hard limit cannot be raised (no
CAP_SYS_RESOURCE); the tables say so when that happens.

    python bench/upgrade.py --quick                      # 1000 conns, 2 upgrades
    python bench/upgrade.py                              # 1000 and 10000 conns, 5 upgrades each
    python bench/upgrade.py --conns 10000 --upgrades 10 --png upgrade.png
    python bench/upgrade.py --conns 9900 --workers 1 2     # the same, with 1 then 2 workers

`--workers 1 2` runs every case once per worker count (`[proxy] workers = N`). With workers the
supervisor moves nothing itself: each old worker hands its connections to a new worker, in
parallel. The handover is then the span from the first old worker's RELEASED to the last one's
`handed_over` (log timestamps), `moved` the sum over the old workers, the old generation's CPU
the supervisor's and every worker's, and a last table compares each N with 1 worker (goal: 2
workers' handover <= 0.6x one worker's).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import collections
import contextlib
import errno
import heapq
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Helper,
    ProxyProcess,
    Upgrade,
    become_subreaper,
    fmt,
    kill_pid,
    machine_note,
    nofile_ceiling,
    percentile,
    print_table,
    raise_nofile,
    ratio,
    read_line,
    say,
)

LINE = 16  # b"%06d %08d\n"
GOAL_HANDOVER_MS = 1000.0
GOAL_P99_STALL_MS = 20.0
FD_MARGIN = 200  # fds the proxy needs besides 2 per connection


# =================================================================================================
# The client (a separate process: python bench/upgrade.py _client ...)
# =================================================================================================

CONNECTING, IDLE, WAITING, DEAD = range(4)


class Stream:
    __slots__ = ("expect", "fd", "got", "idx", "next_at", "out", "sent_at", "seq", "sock",
                 "state")

    def __init__(self, idx: int, sock: socket.socket) -> None:
        self.idx = idx
        self.sock = sock
        self.fd = sock.fileno()
        self.seq = 0
        self.state = CONNECTING
        self.expect = b""
        self.got = bytearray()
        self.out = b""
        self.sent_at = 0.0
        self.next_at = 0.0


def _classify(s: Stream) -> str:
    """Why the reply of `s` differs from what it sent: gap, duplicate/reorder, crossed stream."""
    got, exp = bytes(s.got), s.expect
    i = next((k for k in range(min(len(got), len(exp))) if got[k] != exp[k]), len(exp))
    start = i - i % LINE
    g, e = got[start:start + LINE], exp[start:start + LINE]
    try:
        gid, gseq = (int(x) for x in g.split())
        _, eseq = (int(x) for x in e.split())
    except ValueError:
        return f"corrupt: expected {e!r}, got {g!r}"
    if gid != s.idx:
        return f"crossed: got stream {gid}'s bytes {g!r}"
    if gseq > eseq:
        return f"gap: expected seq {eseq}, got {gseq} ({gseq - eseq} lost)"
    if gseq < eseq:
        return f"duplicate/reorder: expected seq {eseq}, got {gseq} again"
    return f"corrupt: expected {e!r}, got {g!r}"


def client_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="upgrade.py _client")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, required=True)
    ap.add_argument("--first-id", type=int, default=0)
    ap.add_argument("--rate", type=float, required=True, help="bursts per second, all streams")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--connect-concurrency", type=int, default=256)
    ap.add_argument("--connect-timeout", type=float, default=120.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    raise_nofile(a.conns + 256)
    rng = random.Random(a.seed)
    interval = a.conns / a.rate
    ep = select.epoll()
    ep.register(0, select.EPOLLIN)  # control: "stop\n" on stdin
    streams: dict[int, Stream] = {}
    everyone: list[Stream] = []
    heap: list[tuple[float, int]] = []  # (next_at, fd)
    t_send, rtts = array("d"), array("d")
    ids = array("i")
    errors: list[dict[str, Any]] = []
    to_connect = list(range(a.first_id, a.first_id + a.conns))
    to_connect.reverse()
    setting_up = 0  # connecting, or waiting for the first echo: paces the set-up to the proxy
    ready_streams = 0
    ready_said = False
    stopping = False
    stop_deadline = 0.0
    started = time.monotonic()
    next_check = started + 0.25
    out = sys.stdout

    def fail(s: Stream, kind: str, detail: str) -> None:
        nonlocal setting_up
        if s.state == DEAD:
            return
        if s.seq == 0:
            setting_up -= 1
        errors.append({"t": time.monotonic(), "stream": s.idx, "kind": kind, "detail": detail,
                       "seq": s.seq})
        s.state = DEAD
        streams.pop(s.fd, None)
        with contextlib.suppress(OSError):
            ep.unregister(s.fd)
        s.sock.close()

    def send_burst(s: Stream, now: float) -> None:
        n = rng.randint(1, 3)
        s.expect = b"".join(b"%06d %08d\n" % (s.idx, s.seq + k) for k in range(n))
        s.got.clear()
        s.sent_at = now
        s.state = WAITING
        try:
            sent = s.sock.send(s.expect)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            fail(s, "send", errno.errorcode.get(exc.errno or 0, str(exc)))
            return
        if sent < len(s.expect):
            s.out = s.expect[sent:]
            ep.modify(s.fd, select.EPOLLIN | select.EPOLLOUT)

    def start_connects() -> None:
        nonlocal setting_up
        while to_connect and setting_up < a.connect_concurrency:
            idx = to_connect.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = Stream(idx, sock)
            everyone.append(s)
            streams[s.fd] = s
            setting_up += 1
            rc = sock.connect_ex((LOOPBACK, a.port))
            if rc not in (0, errno.EINPROGRESS):
                fail(s, "connect", errno.errorcode.get(rc, str(rc)))
                continue
            ep.register(s.fd, select.EPOLLOUT)

    def on_reply(s: Stream, now: float) -> None:
        nonlocal ready_streams, setting_up
        t_send.append(s.sent_at)
        rtts.append(now - s.sent_at)
        ids.append(s.idx)
        first = s.seq == 0
        s.seq += len(s.expect) // LINE
        s.state = IDLE
        if first:
            ready_streams += 1
            setting_up -= 1
            s.next_at = now + rng.uniform(0, interval)  # spread the phases evenly
        else:
            s.next_at = max(s.next_at + interval, now)
        if not stopping:
            heapq.heappush(heap, (s.next_at, s.fd))

    start_connects()
    while True:
        now = time.monotonic()
        timeout = 0.05
        if heap:
            timeout = min(timeout, max(0.0, heap[0][0] - now))
        for fd, ev in ep.poll(timeout, 1024):
            now = time.monotonic()
            if fd == 0:
                cmd = sys.stdin.readline().strip()
                if cmd in ("stop", ""):
                    stopping = True
                    stop_deadline = now + a.timeout
                    heap.clear()
                    with contextlib.suppress(OSError):
                        ep.unregister(0)
                continue
            s = streams.get(fd)
            if s is None:
                continue
            if s.state == CONNECTING:
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, "connect", errno.errorcode.get(err, str(err)))
                else:
                    ep.modify(fd, select.EPOLLIN)
                    send_burst(s, now)
                continue
            if ev & select.EPOLLOUT and s.out:
                try:
                    n = s.sock.send(s.out)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    fail(s, "send", errno.errorcode.get(exc.errno or 0, str(exc)))
                    continue
                s.out = s.out[n:]
                if not s.out:
                    ep.modify(fd, select.EPOLLIN)
            if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                continue
            try:
                data = s.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                fail(s, "reset", errno.errorcode.get(exc.errno or 0, str(exc)))
                continue
            if not data:
                fail(s, "eof", f"closed by the proxy (state {s.state})")
                continue
            if s.state != WAITING:
                fail(s, "extra", f"unsolicited bytes {data[:32]!r}")
                continue
            s.got += data
            n = len(s.got)
            if s.got != s.expect[:n] or n > len(s.expect):
                fail(s, "mismatch", _classify(s))
                continue
            if n == len(s.expect):
                on_reply(s, now)
        if to_connect:
            start_connects()
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, fd = heapq.heappop(heap)
            s = streams.get(fd)
            if s is not None and s.state == IDLE:
                send_burst(s, now)
        if not ready_said and ready_streams + len(errors) >= a.conns:
            ready_said = True
            out.write(f"ready {ready_streams} {len(errors)}\n")
            out.flush()
        if now >= next_check:
            next_check = now + 0.25
            if not ready_said and now - started > a.connect_timeout:
                for s in list(streams.values()):
                    if s.state in (CONNECTING, WAITING) and s.seq == 0:
                        fail(s, "setup", f"not connected within {a.connect_timeout}s")
            for s in list(streams.values()):
                # (a first echo may wait in the proxy's accept queue: connect_timeout covers it)
                if s.state == WAITING and s.seq and now - s.sent_at > a.timeout:
                    fail(s, "timeout", f"no reply within {a.timeout}s (seq {s.seq})")
        if stopping and (now > stop_deadline or
                         not any(s.state == WAITING for s in streams.values())):
            for s in list(streams.values()):
                if s.state == WAITING:
                    fail(s, "timeout", "no reply by the end of the run")
            break
    for s in everyone:
        s.sock.close()
    prefix = Path(a.out)
    with open(prefix.with_suffix(".t"), "wb") as f:
        t_send.tofile(f)
    with open(prefix.with_suffix(".rtt"), "wb") as f:
        rtts.tofile(f)
    with open(prefix.with_suffix(".ids"), "wb") as f:
        ids.tofile(f)
    prefix.with_suffix(".json").write_text(json.dumps(
        {"errors": errors, "streams": len(everyone), "replies": len(rtts),
         "alive": sum(1 for s in everyone if s.state != DEAD)}))
    out.write("done\n")
    out.flush()
    return 0


# =================================================================================================
# The orchestrator
# =================================================================================================

@dataclass
class ClientResult:
    t_send: array[float]
    rtt: array[float]
    ids: array[int]
    errors: list[dict[str, Any]]
    streams: int


@dataclass
class Case:
    requested: int
    conns: int
    workers: int = 1
    spread: list[int] = field(default_factory=list)  # per worker: connections held at the start
    ready_at: float = 0.0
    baseline_p50: float = float("nan")
    baseline_p99: float = float("nan")
    baseline_max: float = float("nan")
    baseline_cpu: float = float("nan")
    upgrades: list[Upgrade] = field(default_factory=list)
    stalls: list[list[float]] = field(default_factory=list)  # per upgrade: per-stream worst, s
    upgrade_errors: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    result: ClientResult | None = None
    note: str = ""
    log_problems: dict[str, int] = field(default_factory=dict)  # proxy log warnings/errors


def _load(prefix: Path) -> ClientResult:
    def arr(code: str, suffix: str) -> array[Any]:
        a: array[Any] = array(code)
        data = prefix.with_suffix(suffix).read_bytes()
        a.frombytes(data)
        return a

    meta = json.loads(prefix.with_suffix(".json").read_text())
    return ClientResult(arr("d", ".t"), arr("d", ".rtt"), arr("i", ".ids"), meta["errors"],
                        meta["streams"])


class Clients:
    """The client processes of one case; stopped by pid."""

    def __init__(self, port: int, conns: int, procs: int, rate: float, timeout: float,
                 workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.prefixes: list[Path] = []
        self.logs: list[Path] = []
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        first = 0
        for i, n in enumerate(per):
            prefix = workdir / f"client{i}"
            log = workdir / f"client{i}.log"
            self.prefixes.append(prefix)
            self.logs.append(log)
            with open(log, "wb") as logf:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "_client", "--port", str(port),
                     "--conns", str(n), "--first-id", str(first),
                     "--rate", str(rate * n / conns), "--timeout", str(timeout),
                     "--out", str(prefix), "--seed", str(i + 1)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf))
            first += n

    def wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        total = 0
        for p, log in zip(self.procs, self.logs, strict=True):
            assert p.stdout is not None
            line = read_line(p.stdout, max(0.1, deadline - time.monotonic()), "client", log)
            parts = line.split()
            if parts[:1] != ["ready"]:
                raise RuntimeError(f"client said {line!r}")
            total += int(parts[1])
        return total

    def stop(self, timeout: float) -> list[ClientResult]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"stop\n")
            p.stdin.flush()
        deadline = time.monotonic() + timeout
        for p, log in zip(self.procs, self.logs, strict=True):
            assert p.stdout is not None
            line = read_line(p.stdout, max(0.1, deadline - time.monotonic()), "client", log)
            if line != "done":
                raise RuntimeError(f"client said {line!r}")
        return [_load(x) for x in self.prefixes]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                kill_pid(p.pid, 5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5.0)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def _merge(results: list[ClientResult]) -> ClientResult:
    out = ClientResult(array("d"), array("d"), array("i"), [], 0)
    for r in results:
        out.t_send.extend(r.t_send)
        out.rtt.extend(r.rtt)
        out.ids.extend(r.ids)
        out.errors.extend(r.errors)
        out.streams += r.streams
    return out


def socket_count(pid: int) -> int:
    """Sockets open in `pid` (a worker holds 2 per proxied connection)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
    return n


def run_case(requested: int, args: argparse.Namespace, ceiling: int, workers: int = 1) -> Case:
    conns = min(requested, (ceiling - FD_MARGIN) // 2)
    case = Case(requested, conns, workers)
    if conns < requested:
        case.note = (f"{requested} requested; RLIMIT_NOFILE cannot go above {ceiling} here "
                     f"(hard limit, no CAP_SYS_RESOURCE) and the proxy needs 2 fds per "
                     f"connection: ran {conns}")
        say(case.note)
    say(f"--- {conns} connections, {workers} worker(s): echo backend, proxy, client")
    workdir = Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    echo = Helper("echo", nofile=min(ceiling, conns + 1024))
    proxy: ProxyProcess | None = None
    clients: Clients | None = None
    try:
        echo.start()
        proxy = ProxyProcess(
            [{"name": "echo", "upstream": "echo", "backlog": 4096,
              "max_connections": conns + 1000, "idle_timeout": 0.0}],
            {"echo": {"servers": [f"{LOOPBACK}:{echo.port}"]}},
            proxy_opts={"drain_timeout": 30.0, "upgrade_timeout": 60.0}, nofile=ceiling,
            workers=workers)
        proxy.start()
        clients = Clients(proxy.ports["echo"], conns, args.client_procs, args.rate,
                          args.timeout, workdir)
        t0 = time.monotonic()
        ready = clients.wait_ready(timeout=180.0)
        case.ready_at = time.monotonic()
        say(f"{ready}/{conns} streams up in {case.ready_at - t0:.1f}s; baseline "
            f"{args.warmup:g}s at {args.rate:g} bursts/s")
        if workers > 1:
            wp = proxy.worker_pids()
            case.spread = [socket_count(wp[k]) // 2 for k in sorted(wp)]
            say(f"connections per worker (sockets / 2): {case.spread}")
        meter = proxy.meter()
        meter.start()
        time.sleep(args.warmup)
        case.baseline_cpu = meter.stop().total_s / args.warmup * 100
        for k in range(args.upgrades):
            up = proxy.upgrade(timeout=120.0, poll=0.001)
            case.upgrades.append(up)
            per = (f" (per worker: moved {up.worker_moved}, handover_ms "
                   f"{up.worker_handover_ms}, span {up.handover_span_ms:.0f} ms)"
                   if up.workers > 1 else "")
            say(f"upgrade {k + 1}/{args.upgrades}: pid {up.old_pid} -> {up.new_pid}: serving "
                f"after {up.serving_ms:.0f} ms, old gone after {up.exit_ms:.0f} ms, handover "
                f"{up.generation_handover_ms:g} ms for {up.moved} conns{per} (old generation: "
                f"cpu {up.old_cpu_ms:.0f} ms, waited for a cpu {up.old_wait_ms:.0f} ms)")
            time.sleep(args.settle)
        case.result = _merge(clients.stop(timeout=args.timeout + 30))
    finally:
        if clients is not None:
            clients.kill()
        if proxy is not None:
            case.log_problems = dict(collections.Counter(
                re.findall(r"level=(?:warning|error) event=(\S+)", proxy.text())))
            proxy.stop()
        echo.stop()
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    analyse(case)
    return case


def analyse(case: Case) -> None:
    r = case.result
    assert r is not None
    case.errors = r.errors
    first = case.upgrades[0].t_signal if case.upgrades else float("inf")
    base = [rt for t, rt in zip(r.t_send, r.rtt, strict=True)
            if t >= case.ready_at and t + rt < first]
    case.baseline_p50 = percentile(base, 50)
    case.baseline_p99 = percentile(base, 99)
    case.baseline_max = max(base) if base else float("nan")
    for up in case.upgrades:
        worst: dict[int, float] = {}
        for t, rt, i in zip(r.t_send, r.rtt, r.ids, strict=True):
            if t <= up.t_old_exit and t + rt >= up.t_signal and rt > worst.get(i, -1.0):
                worst[i] = rt
        case.stalls.append(list(worst.values()))
        case.upgrade_errors.append(sum(1 for e in r.errors
                                       if up.t_signal - 1.0 <= e["t"] <= up.t_old_exit + 1.0))


# ---- report ------------------------------------------------------------------------------------

def ms(v: float) -> str:
    return fmt(v * 1000, 1)


def report(cases: list[Case], args: argparse.Namespace) -> None:
    rows = []
    for c in cases:
        for k, (up, st, ne) in enumerate(zip(c.upgrades, c.stalls, c.upgrade_errors,
                                             strict=True)):
            late = up.done_moved - up.moved if up.done_moved >= 0 else 0
            rows.append([c.conns, c.workers, k + 1, fmt(up.boot_ms, 0),
                         fmt(up.generation_handover_ms),
                         "/".join(str(m) for m in up.worker_moved) or "-",
                         fmt(up.serving_ms), fmt(up.exit_ms), fmt(up.old_cpu_ms, 0),
                         fmt(up.old_wait_ms, 0), up.moved, late, len(st),
                         ms(percentile(st, 50)), ms(percentile(st, 99)),
                         ms(max(st) if st else float("nan")), ne])
    print_table(f"Upgrades under load (tcp mode, {args.rate:g} echo bursts/s over all streams; "
                f"times in ms; {machine_note()})",
                ["conns", "workers", "#", "boot", "handover", "moved per worker",
                 "SIGUSR2->serving", "SIGUSR2->old exit",
                 "old cpu", "old runq wait", "moved", "late", "sampled", "stall p50", "stall p99",
                 "stall max", "errors"],
                rows)
    print("boot: spawning -> released phase (the new generation started, holds the listeners, "
          "said READY); handover: the old side's handover_ms (pause + send + ACK of every pair, "
          "from RELEASED on; with workers: from the first old worker's RELEASED to the last "
          "one's handed_over, each worker moving its own connections in parallel); old cpu / "
          "old runq wait (with workers: supervisor + workers summed): the old generation's time on a CPU and "
          "time runnable but waiting for a CPU from SIGUSR2 to its exit (/proc/PID/schedstat): a "
          "wait that grows while the cpu does not means a busy machine, not more work; "
          "late: pairs moved after RELEASED; sampled: streams with a burst in "
          "flight between SIGUSR2 and the old generation's exit; stall: the worst echo "
          "round-trip of each such stream")
    rows = []
    for c in cases:
        pooled = [x for st in c.stalls for x in st]
        handover = max((u.generation_handover_ms for u in c.upgrades), default=float("nan"))
        serving = percentile([u.serving_ms for u in c.upgrades], 50)
        p99 = percentile(pooled, 99) * 1000
        verdict = "PASS" if (handover <= GOAL_HANDOVER_MS and p99 <= GOAL_P99_STALL_MS
                             and not c.errors) else "FAIL"
        rows.append([c.conns, c.workers, "/".join(map(str, c.spread)) or "-", len(c.upgrades),
                     ms(c.baseline_p50), ms(c.baseline_p99),
                     fmt(c.baseline_cpu, 0), fmt(serving), fmt(handover),
                     ms(percentile(pooled, 50)), fmt(p99), ms(max(pooled, default=float("nan"))),
                     len(c.errors), verdict])
    print_table(f"Summary (goal: handover <= {GOAL_HANDOVER_MS:g} ms, p99 stall <= "
                f"{GOAL_P99_STALL_MS:g} ms, 0 errors; times in ms)",
                ["conns", "workers", "conns per worker", "upgrades", "base rtt p50",
                 "base rtt p99", "proxy CPU%",
                 "serving (median)", "handover (max)", "stall p50", "stall p99", "stall max",
                 "errors", "goal"], rows)
    compare_workers(cases)
    for c in cases:
        if c.note:
            print(f"note: {c.note}")
        if c.log_problems:
            print(f"proxy log warnings/errors ({c.conns} conns, {c.workers}w): "
                  f"{c.log_problems}")
        for e in c.errors[:10]:
            print(f"error ({c.conns} conns, {c.workers}w): stream {e['stream']} {e['kind']}: {e['detail']}")
        if len(c.errors) > 10:
            print(f"... and {len(c.errors) - 10} more errors")


GOAL_WORKER_HANDOVER = 0.6  # 2 workers' handover <= 0.6x one worker's (issue 10)


def compare_workers(cases: list[Case]) -> None:
    """Per connection count with more than one worker count: each N against 1 worker."""
    by: dict[int, dict[int, Case]] = {}
    for c in cases:
        by.setdefault(c.conns, {})[c.workers] = c
    rows = []
    verdicts = []
    for conns, per in by.items():
        if len(per) < 2 or 1 not in per:
            continue
        base = percentile([u.generation_handover_ms for u in per[1].upgrades], 50)
        for n in sorted(per):
            c = per[n]
            hs = [u.generation_handover_ms for u in c.upgrades]
            med = percentile(hs, 50)
            pooled = [x for st in c.stalls for x in st]
            cpu = percentile([u.old_cpu_ms for u in c.upgrades], 50)
            rows.append([conns, n, len(hs), fmt(med, 0),
                         f"{fmt(min(hs, default=float('nan')), 0)}-"
                         f"{fmt(max(hs, default=float('nan')), 0)}",
                         ratio(med, base), fmt(cpu, 0), ms(percentile(pooled, 99)),
                         ms(max(pooled, default=float("nan"))), len(c.errors)])
            if n == 2:
                ok = med <= GOAL_WORKER_HANDOVER * base
                verdicts.append(f"{conns} conns: 2w/1w handover {ratio(med, base)} (goal <= "
                                f"{GOAL_WORKER_HANDOVER:g}x: {'met' if ok else 'NOT met'})")
    if not rows:
        return
    print_table("Handover by worker count (median over the upgrades; ms)",
                ["conns", "workers", "upgrades", "handover median", "handover min-max",
                 "vs 1w", "old gen cpu median", "stall p99", "stall max", "errors"], rows)
    for v in verdicts:
        print(v)


def plot(cases: list[Case], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--png {path}: matplotlib is not installed (pip install -e '.[bench]'); no plot")
        return
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 4 * len(cases)), squeeze=False)
    for ax, c in zip(axes[:, 0], cases, strict=True):
        r = c.result
        assert r is not None
        t0 = c.ready_at
        xs = [t - t0 for t in r.t_send]
        ys = [rt * 1000 for rt in r.rtt]
        step = max(1, len(xs) // 200_000)
        ax.scatter(xs[::step], ys[::step], s=1, alpha=0.3, linewidths=0, color="tab:blue",
                   label="echo round-trip")
        for k, up in enumerate(c.upgrades):
            ax.axvline(up.t_signal - t0, color="tab:red", lw=1,
                       label="SIGUSR2" if k == 0 else None)
            ax.axvspan(up.t_signal - t0, up.t_old_exit - t0, color="tab:red", alpha=0.08,
                       label="until the old generation exits" if k == 0 else None)
            if up.boot_ms == up.boot_ms:
                ax.axvline(up.t_signal - t0 + up.boot_ms / 1000, color="tab:red", lw=1, ls="--",
                           label="handover starts" if k == 0 else None)
        ax.set_yscale("log")
        ax.set_xlim(left=-0.5)
        ax.set_xlabel("seconds since all streams were up")
        ax.set_ylabel("echo round-trip (ms)")
        ax.set_title(f"{c.conns} connections, {c.workers} worker(s), {len(c.upgrades)} upgrades, "
                     f"{len(c.errors)} errors")
        ax.legend(loc="upper right", markerscale=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conns", type=int, nargs="+", default=[1000, 10000],
                    help="connection counts to run, one case each (1000 10000)")
    ap.add_argument("--upgrades", type=int, default=5, help="upgrades per case (5)")
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="echo bursts per second over all streams (2000)")
    ap.add_argument("--warmup", type=float, default=3.0, help="baseline seconds before the "
                    "first upgrade (3)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between upgrades (2)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="a burst without its echo for this long is an error (10)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes (1)")
    ap.add_argument("--png", metavar="PATH", help="plot echo latency over time (matplotlib)")
    ap.add_argument("--quick", action="store_true", help="1000 connections, 2 upgrades")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], metavar="N",
                    help="run every case with each of these worker counts (1)")
    args = ap.parse_args()
    if any(n < 1 for n in args.workers):
        raise SystemExit("--workers: counts >= 1")
    if args.quick:
        args.conns = [1000]
        args.upgrades = min(args.upgrades, 2)
        args.warmup = min(args.warmup, 2.0)
        args.settle = min(args.settle, 1.0)
    become_subreaper()
    say(machine_note())
    raise_nofile(4096)
    ceiling = nofile_ceiling()
    cases = [run_case(n, args, ceiling, w) for n in args.conns for w in args.workers]
    report(cases, args)
    if args.png:
        plot(cases, args.png)
    return 0 if all(not c.errors for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
