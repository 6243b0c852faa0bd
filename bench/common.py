"""Helpers shared by the benchmark scripts (scripts, not tests).

* tools: `ensure_tools("haproxy", "wrk", "nginx")` installs what is missing with apt-get;
* processes: every process is started here as a `subprocess.Popen` and stopped by its pid
  (SIGTERM, a bounded wait, then SIGKILL); never by name. Every wait has a deadline;
* `ProxyProcess`: our proxy with a generated config in a temp dir, its log file, its port (read
  from the `event=listening` line), the pidfile, and `upgrade()` (SIGUSR2, timed);
* `Nginx`, `HAProxy`: generated minimal configs on 127.0.0.1, foreground, one process each;
* helper servers run as `python bench/common.py ROLE` in their own process (so they get a core
  of their own and never share the benchmark client's GIL): `sink` (counts and discards, then
  answers the byte count) and `echo` (an epoll echo server for thousands of connections);
* `print_table()`: a plain text table, numbers right-aligned.

Run from the repository root; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import contextlib
import ctypes
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from proxy import pidfile

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"

# binary -> Debian package
PACKAGES = {"haproxy": "haproxy", "wrk": "wrk", "nginx": "nginx", "socat": "socat"}


def say(msg: str) -> None:
    """Progress goes to stderr, tables to stdout."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- tools -------------------------------------------------------------------------------------

def ensure_tools(*tools: str) -> None:
    """Install the missing ones with apt-get (as root); exit with a message otherwise."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    pkgs = [PACKAGES.get(t, t) for t in missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing {', '.join(missing)}: install {' '.join(pkgs)} (needs root)")
    say(f"installing {' '.join(pkgs)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]
    if subprocess.run(cmd, env=env, timeout=600, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
        subprocess.run(cmd, env=env, timeout=600, check=True)
    still = [t for t in tools if shutil.which(t) is None]
    if still:
        raise SystemExit(f"still missing after apt-get: {', '.join(still)}")


# ---- processes ---------------------------------------------------------------------------------

def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE of this process to `want` (the hard limit too when allowed, i.e. as
    root, up to fs.nr_open). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = want
    target = min(want, nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_ceiling() -> int:
    """The most RLIMIT_NOFILE a child of ours can get: the hard limit, or fs.nr_open when we
    may raise it (CAP_SYS_RESOURCE). Probed in a throwaway child, so ours stays as it is."""
    probe = ("import resource as r\n"
             "s, h = r.getrlimit(r.RLIMIT_NOFILE)\n"
             "n = int(open('/proc/sys/fs/nr_open').read())\n"
             "try:\n    r.setrlimit(r.RLIMIT_NOFILE, (n, n)); print(n)\n"
             "except (ValueError, OSError):\n    print(h)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return int(out.strip())


def nofile_preexec(want: int) -> Callable[[], None]:
    """A `preexec_fn` that raises the child's RLIMIT_NOFILE (inherited by its own children, so
    by every later proxy generation too)."""

    def preexec() -> None:
        raise_nofile(want)

    return preexec


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphans of our children (a proxy generation started by the previous one, whose
    parent then exits) our children, so we reap them instead of leaving zombies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def alive(pid: int) -> bool:
    """proxy.pidfile.alive, reaping the pid when it is a zombie child of ours."""
    if pidfile.alive(pid):
        return True
    reap(pid)
    return False


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop one process by pid: `sig`, wait up to `timeout`, then SIGKILL."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.01)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.01)


def stop_popen(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        kill_pid(proc.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of `pid` so far, in seconds ((0, 0) once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def proc_children(pid: int) -> set[int]:
    """The live children of `pid`, from /proc/PID/task/*/children (empty once it is gone)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return {p for p in out if pidfile.alive(p)}


@dataclass
class CpuSplit:
    """CPU seconds a proxy generation used over an interval: its entry process (the
    supervisor when it has workers, else the one process serving) and each worker."""

    main_s: float = 0.0
    main_sys_s: float = 0.0
    workers_s: dict[int, float] = field(default_factory=dict)  # worker pid -> CPU seconds
    workers_sys_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.main_s + sum(self.workers_s.values())

    @property
    def sys_s(self) -> float:
        return self.main_sys_s + self.workers_sys_s

    @property
    def serving_s(self) -> float:
        """CPU of the processes that serve traffic: the workers, or the one process."""
        return sum(self.workers_s.values()) if self.workers_s else self.main_s


class CpuMeter:
    """utime + stime of a generation's processes between `start()` and `stop()`: the entry
    pid plus every worker seen at either end (a worker started meanwhile counts from 0, one
    gone meanwhile counts up to its last reading: read before it exits, else lost)."""

    def __init__(self, pid: int, workers: Callable[[], set[int]]) -> None:
        self.pid = pid
        self.workers = workers
        self.t0: dict[int, tuple[float, float]] = {}

    def _read(self) -> dict[int, tuple[float, float]]:
        return {p: cpu_split(p) for p in {self.pid, *self.workers()}}

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> CpuSplit:
        now = self._read()
        out = CpuSplit()
        for p, (cpu, sys_s) in now.items():
            c0, s0 = self.t0.get(p, (0.0, 0.0))
            if p == self.pid:
                out.main_s, out.main_sys_s = cpu - c0, sys_s - s0
            else:
                out.workers_s[p] = cpu - c0
                out.workers_sys_s += sys_s - s0
        return out


def sched_seconds(pid: int) -> tuple[float, float] | None:
    """(time on a CPU, time runnable but waiting for a CPU) of `pid`'s main thread so far, from
    /proc/PID/schedstat; None once it is gone (or without CONFIG_SCHED_INFO). The second number
    is what a busy machine adds to a wall-clock time: it separates "more work" from "less CPU"."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, _ = f.read().split()
    except (OSError, ValueError):
        return None
    return int(run) / 1e9, int(wait) / 1e9


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for tools that cannot be told to use port 0)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None,
              what: str = "server", log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on "
                               f"{port}; log tail:\n{tail(log) if log else ''}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{what}: nothing listens on {LOOPBACK}:{port} after {timeout}s; "
                       f"log tail:\n{tail(log) if log else ''}")


def read_line(stream: IO[bytes], timeout: float, what: str, log: Path | None = None) -> str:
    """One line from a child's stdout pipe, within `timeout`."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{what}: no output within {timeout}s; log tail:\n"
                           f"{tail(log) if log else ''}")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what}: exited before saying anything; log tail:\n"
                           f"{tail(log) if log else ''}")
    return line.decode().strip()


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Service:
    """A foreground server process with a temp dir and a log file; stopped by pid."""

    name = "service"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.log = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None

    def _spawn(self, argv: Sequence[str], *, stdout: int | IO[bytes] | None = None,
               preexec: Callable[[], None] | None = None, env: dict[str, str] | None = None,
               ) -> subprocess.Popen[bytes]:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                     stdout=self._logf if stdout is None else stdout,
                                     stderr=self._logf, preexec_fn=preexec, env=env, cwd=self.dir)
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_popen(self.proc)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- backends ----------------------------------------------------------------------------------

class Nginx(Service):
    """nginx on 127.0.0.1 answering every request with a small fixed body; one process
    (master_process off), no access log, unlimited keep-alive."""

    name = "nginx"

    def __init__(self, body: str = "hello\n", worker_connections: int = 8192) -> None:
        super().__init__()
        self.port = free_port()
        d = self.dir
        temps = "\n".join(f"    {k}_temp_path {d}/{k};" for k in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {2 * worker_connections + 64};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{temps}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body.strip()}\\n"; }}
    }}
}}
""")

    def start(self) -> Nginx:
        ensure_tools("nginx")
        nginx = shutil.which("nginx")
        assert nginx is not None
        proc = self._spawn([nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                            "-c", str(self.dir / "nginx.conf")])
        wait_port(self.port, proc=proc, what="nginx", log=self.log)
        return self


# "": copy through user space; "auto": `option splice-auto` (HAProxy decides when to splice);
# "force": `option splice-request` + `option splice-response` (always splice).
SPLICE_OPTIONS = {"": (), "auto": ("splice-auto",), "force": ("splice-request", "splice-response")}


class HAProxy(Service):
    """HAProxy in mode tcp on 127.0.0.1, foreground (-db), one process. `routes` maps a name to
    (backend address, splice) with splice one of SPLICE_OPTIONS' keys; `ports[name]` is the
    frontend port of each. `tune.pipesize` defaults to our proxy's splice pipe size (1 MiB)."""

    name = "haproxy"

    def __init__(self, routes: dict[str, tuple[str, str]], nbthread: int = 1,
                 maxconn: int = 4000, pipesize: int = 1 << 20) -> None:
        super().__init__()
        self.ports = {name: free_port() for name in routes}
        sections = []
        for name, (backend, splice) in routes.items():
            opts = SPLICE_OPTIONS[splice]
            sections.append(f"listen {name}\n"
                            f"    bind {LOOPBACK}:{self.ports[name]}\n"
                            + "".join(f"    option {o}\n" for o in opts)
                            + f"    server s1 {backend}\n")
        (self.dir / "haproxy.cfg").write_text(f"""\
global
    maxconn {maxconn}
    nbthread {nbthread}
    tune.pipesize {pipesize}

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout client-fin 30s
    timeout server-fin 30s

""" + "\n".join(sections))
        self.maxconn = maxconn

    def start(self) -> HAProxy:
        ensure_tools("haproxy")
        haproxy = shutil.which("haproxy")
        assert haproxy is not None
        proc = self._spawn([haproxy, "-db", "-f", str(self.dir / "haproxy.cfg")],
                           preexec=nofile_preexec(3 * self.maxconn + 1024))
        for name, port in self.ports.items():
            wait_port(port, proc=proc, what=f"haproxy {name}", log=self.log)
        return self


class Helper(Service):
    """One of this module's helper servers (`python bench/common.py ROLE`); it prints
    `port=N` once listening."""

    def __init__(self, role: str, *args: str, nofile: int = 0) -> None:
        self.name = role
        super().__init__()
        self.role = role
        self.args = list(args)
        self.nofile = nofile
        self.port = 0

    def start(self) -> Helper:
        proc = self._spawn([sys.executable, str(Path(__file__).resolve()), self.role, *self.args],
                           stdout=subprocess.PIPE,
                           preexec=nofile_preexec(self.nofile) if self.nofile else None)
        assert proc.stdout is not None
        line = read_line(proc.stdout, 10.0, f"{self.role} helper", self.log)
        m = re.fullmatch(r"port=(\d+)", line)
        if not m:
            raise RuntimeError(f"{self.role} helper said {line!r}")
        self.port = int(m.group(1))
        return self

    def stop(self) -> None:
        super().stop()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


# ---- our proxy ---------------------------------------------------------------------------------

def log_time(stamp: str) -> float:
    """The proxy's log timestamp (`2026-11-22T07:40:01.123Z`) as a unix time."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def machine_note() -> str:
    """CPU count and load: the numbers only compare within one run on one quiet machine."""
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"] * 3
    return f"nproc={os.cpu_count()}, load average {' '.join(load)} (1/5/15 min)"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


@dataclass
class Upgrade:
    """One timed SIGUSR2 (all times are time.monotonic(), comparable across our processes)."""

    old_pid: int
    new_pid: int = 0
    t_signal: float = 0.0
    t_serving: float = 0.0  # the pidfile names the new generation
    t_old_exit: float = 0.0  # the old generation is gone
    handover_ms: float = float("nan")  # from the old side's `handed_over` line
    moved: int = -1
    done_moved: int = -1  # from the old side's `phase=done` line (incl. moved after RELEASED)
    boot_ms: float = float("nan")  # old side's log: phase=spawning -> phase=released (the new
    #                                generation started, took the listeners and said READY)
    old_cpu_ms: float = float("nan")  # the old generation, SIGUSR2 -> exit: time on a CPU
    old_wait_ms: float = float("nan")  # ... and time runnable but waiting for one (busy machine)
    # With workers (> 1): the old generation's supervisor moves nothing itself; each old
    # worker hands its connections to a new worker in parallel. Then `moved` and `done_moved`
    # are the sums over the old workers, `handover_ms` is the longest of their handover_ms,
    # `handover_span_ms` runs from the first worker's RELEASED to the last one's handed_over
    # (log timestamps, ms), and old_cpu_ms / old_wait_ms sum the supervisor and its workers.
    workers: int = 1
    worker_moved: list[int] = field(default_factory=list)
    worker_handover_ms: list[float] = field(default_factory=list)
    handover_span_ms: float = float("nan")


    @property
    def generation_handover_ms(self) -> float:
        """The generation's handover: the one process's handover_ms, or with workers the span
        from the first old worker's RELEASED to the last one's handed_over."""
        return self.handover_span_ms if self.workers > 1 else self.handover_ms

    @property
    def serving_ms(self) -> float:
        return (self.t_serving - self.t_signal) * 1000

    @property
    def exit_ms(self) -> float:
        return (self.t_old_exit - self.t_signal) * 1000


class ProxyProcess(Service):
    """Our proxy as a subprocess. `listeners` are `[[listener]]` tables (listen defaults to
    127.0.0.1:0, mode tcp); `upstreams` are `[upstream.NAME]` tables; `nofile` raises the
    RLIMIT_NOFILE of the first generation (and so of every later one, which inherit it);
    `python` and `root` run it with another interpreter (e.g. a venv with other packages) or
    another source tree (PYTHONPATH) than this script's."""

    name = "proxy"

    def __init__(self, listeners: list[dict[str, Any]], upstreams: dict[str, dict[str, Any]],
                 *, proxy_opts: dict[str, Any] | None = None, metrics: bool = True,
                 nofile: int = 0, python: str | None = None, root: Path | None = None,
                 workers: int = 1) -> None:
        super().__init__()
        self.workers = workers
        self.python = python or sys.executable
        self.root = root or ROOT
        self.listeners = listeners
        self.metrics = metrics
        self.nofile = nofile
        self.config = self.dir / "config.toml"
        self.pidfile = self.dir / "proxy.pid"
        self.ports: dict[str, int] = {}
        self.metrics_port = 0
        self.pids: set[int] = set()
        section = {"pidfile": "proxy.pid", "takeover_socket": "proxy.takeover",
                   "drain_timeout": 30.0, "upgrade_timeout": 60.0, "log_level": "info",
                   **({"workers": workers} if workers != 1 else {}),  # (older trees: no key)
                   **(proxy_opts or {})}
        out = ["[proxy]"] + [f"{k} = {toml_value(v)}" for k, v in section.items()]
        if metrics:
            out += ["", "[metrics]", f'listen = "{LOOPBACK}:0"']
        for lst in listeners:
            lst = {"listen": f"{LOOPBACK}:0", "mode": "tcp", **lst}
            out += ["", "[[listener]]"] + [f"{k} = {toml_value(v)}" for k, v in lst.items()]
        for name, up in upstreams.items():
            out += ["", f"[upstream.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in up.items()]
        self.config.write_text("\n".join(out) + "\n")

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        proc = self._spawn([self.python, "-m", "proxy", "run", "--config", str(self.config)],
                           preexec=nofile_preexec(self.nofile) if self.nofile else None, env=env)
        self.pids.add(proc.pid)
        self.wait_log(rf"event=phase gen=1 pid={proc.pid} .*phase=serving", timeout)
        for lst in self.listeners:
            m = self.wait_log(rf"event=listening .*listener={re.escape(lst['name'])} "
                              rf"addr=\S+:(\d+)", 5.0)
            self.ports[lst["name"]] = int(m.group(1))
        if self.metrics:
            self.metrics_port = int(self.wait_log(r"event=metrics_listening .*addr=\S+:(\d+)",
                                                  5.0).group(1))
        if self.workers > 1:
            self.wait_log(rf"event=workers_serving gen=1 pid={proc.pid} ", timeout)
        return self

    def worker_pids(self, sup: int | None = None) -> dict[int, int]:
        """{worker index: pid} of the live workers of generation `sup` (default: the serving
        one), from its `worker_spawned` / `worker_restarted` lines; empty without workers."""
        sup = self.serving_pid() if sup is None else sup
        if not sup:
            return {}
        out: dict[int, int] = {}
        for k, wpid in re.findall(rf"event=worker_(?:spawned|restarted) gen=\d+ pid={sup} "
                                  rf"worker=(\d+) worker_pid=(\d+)", self.text()):
            out[int(k)] = int(wpid)  # a restart replaces the index's pid (lines in order)
        kids = proc_children(sup)
        return {k: p for k, p in out.items() if p in kids}

    def meter(self, sup: int | None = None) -> CpuMeter:
        """A CpuMeter of generation `sup` (default: the serving one) and its workers."""
        pid = self.serving_pid() if sup is None else sup
        if not pid:
            raise RuntimeError(f"proxy: no serving pid; log tail:\n{tail(self.log)}")
        return CpuMeter(pid, lambda: set(self.worker_pids(pid).values()))

    # ---- logs ------------------------------------------------------------------------------

    def text(self, start: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(start))
            if m:
                return m
            if time.monotonic() > deadline:
                break
            if self.proc is not None and self.proc.poll() is not None and self.serving_pid() is None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"proxy: no log line /{pattern}/ within {timeout}s; log tail:\n"
                           f"{tail(self.log)}")

    # ---- generations -----------------------------------------------------------------------

    def serving_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def upgrade(self, timeout: float = 60.0, poll: float = 0.0005) -> Upgrade:
        """SIGUSR2 to the pid in the pidfile; time until the pidfile names another process
        (new generation serving) and until the old pid is gone; read the old side's
        `handed_over moved=N handover_ms=X` line."""
        old = self.serving_pid()
        if old is None:
            raise RuntimeError(f"proxy: no serving pid; log tail:\n{tail(self.log)}")
        up = Upgrade(old)
        old_workers = self.worker_pids(old)
        up.workers = max(1, len(old_workers))
        procs = [old, *old_workers.values()]
        mark = self.log_size()
        sched0 = {p: sched_seconds(p) for p in procs}
        sched_last = dict(sched0)
        sched_at = 0.0
        up.t_signal = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        deadline = up.t_signal + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now - sched_at >= 0.005:  # the last reading of each before it exits
                for p in procs:
                    sched_last[p] = sched_seconds(p) or sched_last[p]
                sched_at = now
            if not up.t_serving:
                pid = self.serving_pid()
                if pid is not None and pid != old:
                    up.t_serving, up.new_pid = now, pid
                    self.pids.add(pid)
            if up.t_serving and not alive(old):
                up.t_old_exit = now
                break
            time.sleep(poll)
        else:
            raise RuntimeError(f"proxy: upgrade of pid {old} did not complete within {timeout}s;"
                               f" log tail:\n{tail(self.log)}")
        m = self.wait_log(rf"event=handed_over gen=\d+ pid={old} moved=(\d+) "
                          rf"handover_ms=([\d.]+)", 5.0, mark)
        up.moved, up.handover_ms = int(m.group(1)), float(m.group(2))
        pairs = [(sched0[p], sched_last[p]) for p in procs]
        if all(a is not None and b is not None for a, b in pairs):
            up.old_cpu_ms = sum(b[0] - a[0] for a, b in pairs if a and b) * 1000
            up.old_wait_ms = sum(b[1] - a[1] for a, b in pairs if a and b) * 1000
        text = self.text(mark)
        if old_workers:
            self._worker_handover(up, old_workers, mark)
        spawning = re.search(rf"^(\S+) level=info event=phase gen=\d+ pid={old} phase=spawning",
                             text, re.M)
        handover = re.search(rf"^(\S+) level=info event=phase gen=\d+ pid={old} phase=released",
                             text, re.M)
        if spawning and handover:
            up.boot_ms = (log_time(handover.group(1)) - log_time(spawning.group(1))) * 1000
        # (a single process moves its connections on its worker channel's session, protocol 4:
        # that Upgrader logs them as worker_channel_phase; the generation's own moved=0)
        d = (re.search(rf"event=worker_channel_phase gen=\d+ pid={old} .*phase=done moved=(\d+)",
                       self.text(mark))
             or re.search(rf"event=phase gen=\d+ pid={old} .*phase=done moved=(\d+)",
                          self.text(mark)))
        if d and not old_workers:
            up.done_moved = int(d.group(1))
        self.wait_log(rf"event=takeover_done gen=\d+ pid={up.new_pid}", 10.0, mark)
        return up

    def _worker_handover(self, up: Upgrade, workers: dict[int, int], mark: int) -> None:
        """Fill `up`'s handover fields from the old workers' own lines (see Upgrade)."""
        handed: dict[int, re.Match[str]] = {}
        deadline = time.monotonic() + 10.0
        while len(handed) < len(workers) and time.monotonic() < deadline:
            for m in re.finditer(r"^(\S+) level=info event=handed_over gen=\d+ pid=(\d+) "
                                 r"worker=\d+ moved=(\d+) handover_ms=([\d.]+)",
                                 self.text(mark), re.M):
                if int(m.group(2)) in workers.values():
                    handed[int(m.group(2))] = m
            time.sleep(0.02)
        if len(handed) < len(workers):
            raise RuntimeError(f"proxy: only {len(handed)} of the {len(workers)} old workers "
                               f"logged handed_over; log tail:\n{tail(self.log)}")
        text = self.text(mark)
        by_pid = sorted(handed.items(), key=lambda kv: kv[0])
        up.worker_moved = [int(m.group(3)) for _, m in by_pid]
        up.worker_handover_ms = [float(m.group(4)) for _, m in by_pid]
        up.moved = sum(up.worker_moved)
        up.handover_ms = max(up.worker_handover_ms)
        released = [log_time(m.group(1)) for m in re.finditer(
            r"^(\S+) level=info event=phase gen=\d+ pid=(\d+) worker=\d+ phase=released",
            text, re.M) if int(m.group(2)) in workers.values()]
        if released:
            last = max(log_time(m.group(1)) for m in handed.values())
            up.handover_span_ms = (last - min(released)) * 1000
        done = [int(m.group(2)) for m in re.finditer(
            r"event=phase gen=\d+ pid=(\d+) worker=\d+ phase=done moved=(\d+)", text)
            if int(m.group(1)) in workers.values()]
        if len(done) == len(workers):
            up.done_moved = sum(done)

    def stop(self) -> None:
        """Stop every generation this deployment ran (pids from the log and the pidfile)."""
        pids = set(self.pids) | {int(p) for p in re.findall(r" pid=(\d+)", self.text())}
        serving = self.serving_pid()
        if serving is not None:
            pids.add(serving)
        for pid in pids:
            kill_pid(pid, timeout=10.0)
        super().stop()

    def metric_lines(self, prefix: str) -> list[str]:
        """Lines of GET /metrics starting with `prefix` (empty on any failure)."""
        if not self.metrics_port:
            return []
        try:
            with socket.create_connection((LOOPBACK, self.metrics_port), timeout=5.0) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return []
        return [ln for ln in data.decode(errors="replace").splitlines() if ln.startswith(prefix)]


# ---- tables ------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def fmt(v: float, digits: int = 1) -> str:
    if v != v:  # nan
        return "-"
    return f"{v:,.{digits}f}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        out = []
        for i, c in enumerate(r):
            numeric = bool(re.fullmatch(r"[-+]?[\d,.]+(x|%| ms| s)?|-", c))
            out.append(c.rjust(widths[i]) if numeric and i else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


@dataclass
class ScalePoint:
    """One measurement of our proxy with `workers` workers under a fixed load."""

    workers: int
    rps: float
    requests: int
    cpu: CpuSplit
    wall_s: float
    round: int = 0  # points of the same round ran back to back (per-round ratios)

    @property
    def us_per_req(self) -> float:
        """All of the generation's CPU (supervisor + workers) per request, in µs."""
        return self.cpu.total_s / self.requests * 1e6 if self.requests else float("nan")

    @property
    def us_per_req_worker(self) -> float:
        """The serving processes' CPU per request, in µs: what one request costs the worker
        that served it (with one worker: the one process)."""
        return self.cpu.serving_s / self.requests * 1e6 if self.requests else float("nan")


def _span(values: Sequence[float], digits: int) -> str:
    lo, hi = min(values), max(values)
    med = statistics.median(values)
    if len(values) == 1 or fmt(lo, digits) == fmt(hi, digits):
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(lo, digits)}-{fmt(hi, digits)})"


GOAL_SCALING = 1.6  # 2 workers vs 1, same load (issue 10)
CPU_GROWTH_TOLERANCE = 1.10  # CPU per request per worker "does not grow": within 10%


def print_scaling(title: str, points: Sequence[ScalePoint]) -> list[str]:
    """The worker scaling table (medians over the rounds, min-max in brackets); returns the
    goal verdict lines (also printed)."""
    by: dict[int, list[ScalePoint]] = {}
    for pt in points:
        by.setdefault(pt.workers, []).append(pt)
    if not by:
        return []

    def med(vals: list[float]) -> float:
        return statistics.median(vals)

    base_n = min(by)
    base_rps = med([p.rps for p in by[base_n]])
    base_cpu = med([p.us_per_req_worker for p in by[base_n]])
    rows = []
    for n in sorted(by):
        pts = by[n]
        rps = [p.rps for p in pts]
        share = [100 * p.cpu.main_s / p.cpu.total_s if p.cpu.total_s else 0.0 for p in pts]
        split = []
        for p in pts:
            ws = sorted(p.cpu.workers_s.values(), reverse=True)
            tot = sum(ws)
            split.append("/".join(f"{100 * w / tot:.0f}" for w in ws) if tot else "-")
        rows.append([n, len(pts), _span(rps, 0), ratio(med(rps), base_rps),
                     _span([100 * p.cpu.total_s / p.wall_s for p in pts], 0),
                     _span(share, 1) if n > 1 else "-",
                     _span([p.us_per_req for p in pts], 1),
                     _span([p.us_per_req_worker for p in pts], 1),
                     ratio(med([p.us_per_req_worker for p in pts]), base_cpu),
                     " ".join(split) if n > 1 else "-"])
    print_table(title, ["workers", "runs", "req/s", f"vs {base_n}w", "proxy CPU%",
                        "supervisor %", "CPU/req all us", "CPU/req/worker us", f"vs {base_n}w",
                        "worker CPU split %"], rows)
    print("proxy CPU%: the supervisor and every worker together (100% = one core); supervisor "
          "%: its share of that; CPU/req all: that CPU / requests completed; CPU/req/worker: "
          "the workers' CPU only / requests (what a request costs the worker serving it; with 1 "
          "worker the one process); worker CPU split: each worker's share of the workers' CPU, "
          "per run (even = the accepts were balanced); medians, min-max in brackets")
    verdicts = []
    if len(by) > 1:
        for n in sorted(by):
            if n == base_n:
                continue
            r = med([p.rps for p in by[n]]) / base_rps if base_rps else float("nan")
            c = med([p.us_per_req_worker for p in by[n]]) / base_cpu if base_cpu else float("nan")
            rounds = {p.round for p in points}
            per_round = [
                f"{by_round[n] / by_round[base_n]:.2f}x" for rnd in sorted(rounds)
                if (by_round := {p.workers: p.rps for p in points if p.round == rnd})
                and n in by_round and base_n in by_round and by_round[base_n]]
            line = f"{n}w/{base_n}w rate {r:.2f}x (ratio of medians"
            line += f"; by round: {', '.join(per_round)})" if len(per_round) > 1 else ")"
            if n == 2 and base_n == 1:
                line += f" (goal >= {GOAL_SCALING:g}x: {'met' if r >= GOAL_SCALING else 'NOT met'})"
            line += (f"; CPU/req/worker {c:.2f}x of {base_n}w (goal: not growing, within "
                     f"{CPU_GROWTH_TOLERANCE:.2f}x: {'met' if c <= CPU_GROWTH_TOLERANCE else 'NOT met'})")
            verdicts.append(line)
            print(line)
    sys.stdout.flush()
    return verdicts


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


# ---- helper servers (python bench/common.py ROLE) ----------------------------------------------

COUNT = struct.Struct("!Q")


def _listen(backlog: int = 4096) -> socket.socket:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((LOOPBACK, 0))
    ls.listen(backlog)
    print(f"port={ls.getsockname()[1]}", flush=True)
    return ls


def serve_sink() -> None:
    """One connection at a time: discard everything (splice to /dev/null, no copy to user
    space), then on EOF answer the byte count (8 bytes, network order) and close."""
    ls = _listen(64)
    null = os.open("/dev/null", os.O_WRONLY)
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        import fcntl
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = ls.accept()
        total = 0
        try:
            use_splice = hasattr(os, "splice")
            while True:
                if use_splice:
                    try:
                        n = os.splice(conn.fileno(), w, 1 << 20)
                    except OSError:
                        use_splice = False
                        continue
                    left = n
                    while left:
                        left -= os.splice(r, null, left)
                else:
                    n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(COUNT.pack(total))
        except OSError:
            pass
        finally:
            conn.close()


def serve_echo() -> None:
    """An epoll echo server for many connections (edge cases: partial sends are buffered)."""
    ls = _listen(4096)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    lfd = ls.fileno()

    def close(fd: int) -> None:
        s = conns.pop(fd, None)
        pending.pop(fd, None)
        if s is not None:
            with contextlib.suppress(OSError):
                ep.unregister(fd)
            s.close()

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                for _ in range(256):
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and friends: try again on the next wakeup
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            s = conns.get(fd)
            if s is None:
                continue
            try:
                if ev & select.EPOLLOUT and fd in pending:
                    data = pending.pop(fd)
                    n = s.send(data)
                    if n < len(data):
                        pending[fd] = data[n:]
                    else:
                        ep.modify(fd, select.EPOLLIN)
                    continue
                if fd in pending:
                    continue
                data = s.recv(65536)
                if not data:
                    close(fd)
                    continue
                n = s.send(data)
                if n < len(data):
                    pending[fd] = data[n:]
                    ep.modify(fd, select.EPOLLOUT)
            except BlockingIOError:
                continue
            except OSError:
                close(fd)


@contextlib.contextmanager
def started(*services: Any) -> Iterator[None]:
    """Start each service in order; stop all started ones (reverse order) on the way out."""
    up: list[Any] = []
    try:
        for s in services:
            up.append(s)
            s.start()
        yield
    finally:
        for s in reversed(up):
            with contextlib.suppress(Exception):
                s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="bench helper servers (127.0.0.1, port 0)")
    ap.add_argument("role", choices=["sink", "echo"])
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.role == "sink":
        serve_sink()
    else:
        serve_echo()


if __name__ == "__main__":
    main()
