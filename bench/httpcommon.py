"""Helpers of the http-mode benchmarks (bench/http.py, bench/reload.py); builds on bench/common.py.

* `run_wrk()` / `WrkRun`: wrk with `--latency`, blocking or in the background, its output parsed
  into `WrkResult` (requests, req/s, p50/p99, socket errors by kind, non-2xx);
* `HAProxyHttp`: HAProxy in mode http (keep-alive both sides, `http-reuse always`), either one
  foreground process (`-db`) or master-worker (`-W`) with `reload()` = SIGUSR2 to the master;
* `NginxProxy`: nginx (master + 1 worker) as an HTTP/1.1 keep-alive reverse proxy, with
  `reload()` = SIGHUP to the master;
* `http_proxy()`: our proxy with one http listener (`access_log = false`);
* `children()`: the pids whose parent is a given pid (from /proc).

Everything listens on 127.0.0.1; every process is stopped by pid; every wait has a deadline.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    ProxyProcess,
    Service,
    alive,
    ensure_tools,
    free_port,
    kill_pid,
    nofile_preexec,
    stop_popen,
    tail,
    wait_port,
)

# ---- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non2xx: int = 0
    output: str = ""

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non2xx


def parse_wrk(text: str) -> WrkResult:
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not total or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    res = WrkResult(int(total.group(1)), _ms(total.group(2) + total.group(3)) / 1000,
                    float(rps.group(1)), _ms(p50.group(1)) if p50 else float("nan"),
                    _ms(p99.group(1)) if p99 else float("nan"), output=text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        res.connect, res.read, res.write, res.timeout = (int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        res.non2xx = int(non2xx.group(1))
    return res


def wrk_cmd(port: int, duration: float, conns: int, threads: int, timeout: float = 2.0) -> list[str]:
    ensure_tools("wrk")
    wrk = shutil.which("wrk")
    assert wrk is not None
    return [wrk, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s", "--latency", f"http://{LOOPBACK}:{port}/"]


class WrkRun:
    """wrk in the background (its own process, stopped by pid if still running on close)."""

    def __init__(self, port: int, duration: float, conns: int, threads: int,
                 timeout: float = 2.0) -> None:
        self.cmd = wrk_cmd(port, duration, conns, threads, timeout)
        self.duration = duration
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def interrupt(self) -> None:
        """SIGINT: wrk stops and prints its report as at the end of its duration."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)

    def result(self) -> WrkResult:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            self.close()
            raise RuntimeError(f"wrk did not finish within {self.duration + 60}s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"wrk exited {self.proc.returncode}: {err.strip() or out}")
        return parse_wrk(out)

    def close(self) -> None:
        stop_popen(self.proc, timeout=5.0)
        self.proc = None

    def __enter__(self) -> WrkRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_wrk(port: int, duration: float, conns: int, threads: int, timeout: float = 2.0) -> WrkResult:
    with WrkRun(port, duration, conns, threads, timeout) as run:
        return run.result()


# ---- processes ---------------------------------------------------------------------------------

def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def background_load(seconds: float = 1.0) -> float:
    """CPU busy on this machine over `seconds`, in % of one core, before we start anything
    (another benchmark running at the same time skews every number)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    ncpu = os.cpu_count() or 1
    return 100.0 * ncpu * (b1 - b0) / max(1, t1 - t0)


def load_note(seconds: float = 1.0) -> str:
    busy = background_load(seconds)
    note = f"machine busy before the run: {busy:.0f}% of a core (nproc={os.cpu_count()})"
    if busy > 15:
        note += " -- WARNING: something else is running; the numbers below are skewed"
    return note


def children(pid: int) -> set[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


@dataclass
class Reload:
    """One reload of a master/worker server: how long until a new worker ran and until every
    old worker had exited (nan when not within the deadline)."""

    new_ms: float = float("nan")
    old_gone_ms: float = float("nan")
    new_workers: set[int] = field(default_factory=set)


class MasterWorker(Service):
    """A server whose foreground master forks workers and reloads on a signal."""

    reload_signal = signal.SIGHUP

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
        self.workers: set[int] = set()  # every worker pid seen, for clean-up
        self.wait_new_timeout = 20.0
        self.wait_old_timeout = 30.0

    def _wait_workers(self, timeout: float = 20.0) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = children(self.pid)
            if now:
                self.workers |= now
                return now
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no worker after {timeout}s; log tail:\n{tail(self.log)}")

    def reload(self, poll: float = 0.005) -> Reload:
        """Signal the master; return once a new worker runs and the old ones are gone (or the
        deadlines passed: then the Reload says nan)."""
        old = children(self.pid)
        self.workers |= old
        r = Reload()
        t0 = time.monotonic()
        os.kill(self.pid, self.reload_signal)
        deadline = t0 + self.wait_new_timeout
        while time.monotonic() < deadline:
            new = children(self.pid) - old
            if new:
                r.new_workers = new
                self.workers |= new
                r.new_ms = (time.monotonic() - t0) * 1000
                break
            time.sleep(poll)
        deadline = t0 + self.wait_old_timeout
        while time.monotonic() < deadline:
            if not any(alive(p) for p in old):
                r.old_gone_ms = (time.monotonic() - t0) * 1000
                break
            time.sleep(poll)
        return r

    def stop(self) -> None:
        if self.proc is not None:
            self.workers |= children(self.pid)
        super().stop()  # the master first (it stops its workers), then any left by pid
        for pid in self.workers:
            kill_pid(pid, timeout=5.0)


class HAProxyHttp(MasterWorker):
    """HAProxy in mode http in front of `backend` (host:port): keep-alive to the client and to
    the server (`option http-keep-alive`, `http-reuse always`). `master_worker` runs it as
    `haproxy -W` (reload: SIGUSR2 to the master); otherwise one foreground process."""

    name = "haproxy"
    reload_signal = signal.SIGUSR2

    def __init__(self, backend: str, nbthread: int = 1, master_worker: bool = False,
                 maxconn: int = 4000) -> None:
        super().__init__()
        self.master_worker = master_worker
        self.maxconn = maxconn
        self.cfg = self.dir / "haproxy.cfg"
        self.cfg.write_text(f"""\
global
    maxconn {maxconn}
    nbthread {nbthread}
    hard-stop-after 30s

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind {LOOPBACK}:{self.port}
    default_backend be

backend be
    http-reuse always
    server s1 {backend}
""")

    def start(self) -> HAProxyHttp:
        ensure_tools("haproxy")
        haproxy = shutil.which("haproxy")
        assert haproxy is not None
        argv = [haproxy, "-W", "-db", "-f", str(self.cfg)] if self.master_worker \
            else [haproxy, "-db", "-f", str(self.cfg)]
        proc = self._spawn(argv, preexec=nofile_preexec(3 * self.maxconn + 1024))
        wait_port(self.port, proc=proc, what="haproxy", log=self.log)
        if self.master_worker:
            self._wait_workers()
        return self

    @property
    def serving_pid(self) -> int:
        """The process doing the work (the worker in master-worker mode)."""
        if self.master_worker:
            return max(children(self.pid), default=self.pid)
        return self.pid


class NginxProxy(MasterWorker):
    """nginx as a reverse proxy (master + `workers` workers) in front of `backend` (host:port),
    HTTP/1.1 keep-alive to the upstream. Reload: SIGHUP to the master."""

    name = "nginxproxy"
    reload_signal = signal.SIGHUP

    def __init__(self, backend: str, workers: int = 1) -> None:
        super().__init__()
        d = self.dir
        d.chmod(0o755)  # workers run as nobody when we are root
        temps = "\n".join(f"    {k}_temp_path {d}/{k};" for k in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(f"""\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
worker_shutdown_timeout 30s;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{temps}
    upstream be {{
        server {backend};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")

    def start(self) -> NginxProxy:
        ensure_tools("nginx")
        nginx = shutil.which("nginx")
        assert nginx is not None
        proc = self._spawn([nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                            "-c", str(self.dir / "nginx.conf")])
        wait_port(self.port, proc=proc, what="nginx", log=self.log)
        self._wait_workers()
        return self


# ---- our proxy ---------------------------------------------------------------------------------

def http_proxy(backend_port: int, conns: int, *, python: str | None = None,
               root: Path | None = None, workers: int = 1, **listener: Any) -> ProxyProcess:
    """Our proxy with one mode-http listener `web` (access_log off) in front of 127.0.0.1:port;
    the pool keeps up to 2 x `conns` idle upstream connections (at least the default 32).
    `python` / `root` / `workers`: see ProxyProcess."""
    lst = {"name": "web", "mode": "http", "upstream": "app", "access_log": False, **listener}
    return ProxyProcess([lst], {"app": {"servers": [f"{LOOPBACK}:{backend_port}"],
                                        "pool_max_idle": max(32, 2 * conns)}},
                        python=python, root=root, workers=workers)


def proxy_pid(p: ProxyProcess) -> int:
    pid = p.serving_pid()
    if pid is None:
        raise RuntimeError(f"proxy: no serving pid; log tail:\n{tail(p.log)}")
    return pid


def read_text(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""
