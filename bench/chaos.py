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
  `/slow?ms=`, `/ws` that answers an `Upgrade` with 101 and then echoes) in a process of its own;
* the proxy (`python -m proxy run`, cwd = its temp dir) with a tcp listener in front of the echo
  backend and an http listener in front of the http backend, fixed ports so that a fresh proxy
  started after a stop serves the same addresses; every later generation is found in its log;
* the load (`python bench/chaos.py _load`, one trio process): sequence-checked tcp streams, short
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
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import (
    LOOPBACK,
    Helper,
    ProxyProcess,
    alive,
    become_subreaper,
    fmt,
    free_port,
    kill_pid,
    log_time,
    machine_note,
    print_table,
    read_line,
    say,
    stop_popen,
)

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
PHASE_ORDER = {"spawned": 0, "spawning": 0, "handshake": 1, "wait_ready": 2, "handover": 3,
               "released": 4, "done": 5}
ACCEPTING = {"serving", "spawning", "handshake", "wait_ready", "handover"}
STALL_S = 0.1  # ops slower than this are reported as stalls


# =================================================================================================
# The load (python bench/chaos.py _load ...): one trio process
# =================================================================================================

class Mismatch(Exception):
    """An echo or a response that is not what was sent / asked for."""


class Recorder:
    """Client events as JSON lines (errors, stalls) plus a progress file of ops per client."""

    def __init__(self, out: Path, stop_flag: Callable[[], bool]) -> None:
        self.f = open(out / "events.jsonl", "a")  # noqa: SIM115 - closed by close()
        self.progress_path = out / "progress.json"
        self.counts: dict[str, int] = {}
        self.stopping = stop_flag

    def ok(self, client: str, t_op: float, expected: float = 0.0) -> None:
        self.counts[client] = self.counts.get(client, 0) + 1
        took = time.time() - t_op - expected
        if took > STALL_S:
            self._write({"type": "stall", "client": client, "t": time.time(), "t_op": t_op,
                         "s": round(took, 4)})

    def error(self, client: str, what: str, t_op: float, timeout: bool = False) -> None:
        if self.stopping():  # shutting the load down is not the proxy's fault
            return
        self._write({"type": "error", "client": client, "t": time.time(), "t_op": t_op,
                     "timeout": timeout, "what": what[:300]})

    def _write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def write_progress(self) -> None:
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.counts))
        os.replace(tmp, self.progress_path)

    def close(self) -> None:
        self.write_progress()
        self.f.close()


def _load_errors() -> tuple[type[BaseException], ...]:
    import h11
    import trio
    return (OSError, EOFError, Mismatch, ValueError, KeyError, trio.TooSlowError,
            trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


def load_main(argv: list[str]) -> int:
    import h11
    import trio

    ap = argparse.ArgumentParser()
    ap.add_argument("--tcp-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--http-clients", type=int, default=4)
    ap.add_argument("--slow-ms", default="1000-3000")
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("--max-seconds", type=float, default=7200.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    slow_lo, slow_hi = (int(x) for x in a.slow_ms.split("-"))
    stop = trio.Event()
    rec = Recorder(Path(a.out), stop.is_set)
    errors = _load_errors()

    async def pause(backoff: list[float]) -> None:
        # Reconnect with a growing pause, so a stopped service costs a few errors a second.
        await trio.sleep(backoff[0])
        backoff[0] = min(1.0, backoff[0] * 2)

    async def seq_echo(stream: trio.abc.Stream, name: str, rng: random.Random,
                       buf: bytearray) -> None:
        """Bursts of `%08d\\n` lines, each echo compared with what was sent."""
        seq = 0
        while not stop.is_set():
            burst = rng.randint(1, 4)
            out = b"".join(b"%08d\n" % (seq + i) for i in range(burst))
            t_op = time.time()
            try:
                with trio.fail_after(a.timeout):
                    await stream.send_all(out)
                    while len(buf) < len(out):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise EOFError("EOF")
                        buf += chunk
            except trio.TooSlowError:
                rec.error(name, f"no echo within {a.timeout}s at seq {seq}", t_op, timeout=True)
                return
            except errors as exc:
                rec.error(name, f"at seq {seq}: {type(exc).__name__}: {exc}", t_op)
                return
            got = bytes(buf[:len(out)])
            del buf[:len(out)]
            if got != out:
                rec.error(name, f"at seq {seq}: sent {out[:40]!r}, got {got[:40]!r}", t_op)
                return
            rec.ok(name, t_op)
            seq += burst
            await trio.sleep(rng.uniform(0.005, 0.03))

    async def tcp_stream(k: int) -> None:
        name, rng, backoff = f"tcp{k}", random.Random(a.seed * 1000 + k), [0.2]
        while not stop.is_set():
            t_op = time.time()
            try:
                with trio.fail_after(a.timeout):
                    stream = await trio.open_tcp_stream(LOOPBACK, a.tcp_port)
            except errors as exc:
                rec.error(name, f"connect: {type(exc).__name__}: {exc}", t_op)
                await pause(backoff)
                continue
            backoff[0] = 0.2
            async with stream:
                await seq_echo(stream, name, rng, bytearray())
            if not stop.is_set():
                await pause(backoff)

    async def short_conns() -> None:
        n, backoff = 0, [0.2]
        while not stop.is_set():
            n += 1
            msg = b"short %d\n" % n
            t_op = time.time()
            try:
                with trio.fail_after(a.timeout):
                    stream = await trio.open_tcp_stream(LOOPBACK, a.tcp_port)
                    async with stream:
                        await stream.send_all(msg)
                        got = b""
                        while len(got) < len(msg):
                            chunk = await stream.receive_some(100)
                            if not chunk:
                                raise EOFError(f"EOF after {got!r}")
                            got += chunk
                        if got != msg:
                            raise Mismatch(f"{got!r} != {msg!r}")
                rec.ok("short", t_op)
                backoff[0] = 0.2
                await trio.sleep(0.02)
            except errors as exc:
                rec.error("short", f"#{n}: {type(exc).__name__}: {exc}", t_op,
                          timeout=isinstance(exc, trio.TooSlowError))
                await pause(backoff)

    class HttpConn:
        def __init__(self, stream: trio.SocketStream) -> None:
            self.stream = stream
            self.h = h11.Connection(h11.CLIENT)

        async def request(self, target: str, headers: list[tuple[str, str]] | None = None,
                          ) -> tuple[int, bytes]:
            data = self.h.send(h11.Request(method="GET", target=target,
                                           headers=[("Host", "chaos"), *(headers or [])]))
            data = (data or b"") + (self.h.send(h11.EndOfMessage()) or b"")
            await self.stream.send_all(data)
            status, body = 0, b""
            while True:
                ev = self.h.next_event()
                if ev is h11.NEED_DATA:
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        raise EOFError(f"EOF before the response was complete (status {status})")
                    self.h.receive_data(chunk)
                elif isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    return 101, b""
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    return status, body
                elif isinstance(ev, h11.ConnectionClosed):
                    raise EOFError("connection closed")

        def reusable(self) -> bool:
            try:
                self.h.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True

    async def http_client(name: str, slow: bool) -> None:
        rng, backoff, n = random.Random(zlib.crc32(name.encode()) ^ a.seed), [0.2], 0
        conn: HttpConn | None = None
        while not stop.is_set():
            n += 1
            ms = rng.randint(slow_lo, slow_hi) if slow else 0
            target = f"/slow?ms={ms}&c={name}&n={n}" if slow else f"/echo?c={name}&n={n}"
            t_op = time.time()
            try:
                with trio.fail_after(a.timeout + ms / 1000):
                    if conn is None:
                        conn = HttpConn(await trio.open_tcp_stream(LOOPBACK, a.http_port))
                    status, body = await conn.request(target)
                if status != 200:
                    raise Mismatch(f"status {status}: {body[:100]!r}")
                got = json.loads(body)["path"]
                if got != target:
                    raise Mismatch(f"asked for {target}, got the answer for {got}")
                rec.ok(name, t_op, expected=ms / 1000)
                backoff[0] = 0.2
                if not conn.reusable():  # the proxy said Connection: close (allowed)
                    rec.counts[name + "_closed"] = rec.counts.get(name + "_closed", 0) + 1
                    await conn.stream.aclose()
                    conn = None
                await trio.sleep(0.0 if slow else rng.uniform(0.01, 0.05))
            except errors as exc:
                rec.error(name, f"{target}: {type(exc).__name__}: {exc}", t_op,
                          timeout=isinstance(exc, trio.TooSlowError))
                if conn is not None:
                    with contextlib.suppress(*errors):
                        await conn.stream.aclose()
                    conn = None
                await pause(backoff)

    async def tunnel() -> None:
        name, rng, backoff = "tunnel", random.Random(a.seed), [0.2]
        while not stop.is_set():
            t_op = time.time()
            try:
                with trio.fail_after(a.timeout):
                    stream = await trio.open_tcp_stream(LOOPBACK, a.http_port)
                    conn = HttpConn(stream)
                    status, _ = await conn.request("/ws", [("Connection", "Upgrade"),
                                                           ("Upgrade", "chaos-echo")])
                if status != 101:
                    await stream.aclose()
                    raise Mismatch(f"Upgrade answered with {status}")
            except errors as exc:
                rec.error(name, f"upgrade: {type(exc).__name__}: {exc}", t_op)
                await pause(backoff)
                continue
            rec.ok(name, t_op)
            backoff[0] = 0.2
            async with stream:
                await seq_echo(stream, name, rng, bytearray(conn.h.trailing_data[0]))
            if not stop.is_set():
                await pause(backoff)

    async def progress() -> None:
        while True:
            rec.write_progress()
            await trio.sleep(0.1)

    async def control(nursery: trio.Nursery) -> None:
        # "stop" on stdin (or EOF: the orchestrator is gone) ends the load.
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        stop.set()
        with trio.move_on_after(4.0):  # clients finish their op, then leave their loops
            while any(k.startswith("c:") for k in running):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()

    running: set[str] = set()

    async def client(key: str, fn: Callable[..., Any], *args: Any) -> None:
        running.add(key)
        try:
            await fn(*args)
        finally:
            running.discard(key)

    async def main() -> None:
        with trio.move_on_after(a.max_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(progress)
                for k in range(a.streams):
                    nursery.start_soon(client, f"c:tcp{k}", tcp_stream, k)
                nursery.start_soon(client, "c:short", short_conns)
                for k in range(a.http_clients):
                    nursery.start_soon(client, f"c:http{k}", http_client, f"http{k}", False)
                nursery.start_soon(client, "c:slow", http_client, "slow", True)
                nursery.start_soon(client, "c:tunnel", tunnel)
                print("ready", flush=True)
                nursery.start_soon(control, nursery)

    trio.run(main)
    rec.close()
    print("done", flush=True)
    return 0


def http_backend_main() -> int:
    """The tests' HTTP backend (threads, stdlib) in a process of its own; prints port=N."""
    from tests.support.httpbackend import HttpBackend

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    backend = HttpBackend()
    print(f"port={backend.port}", flush=True)
    while True:
        time.sleep(3600)


class ChaosHelper(Helper):
    """A helper role of this script (`python bench/chaos.py ROLE`), started like common's."""

    def start(self) -> ChaosHelper:
        proc = self._spawn([sys.executable, str(Path(__file__).resolve()), self.role, *self.args],
                           stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        m = re.fullmatch(r"port=(\d+)", read_line(proc.stdout, 15.0, self.role, self.log))
        if not m:
            raise RuntimeError(f"{self.role} helper did not say its port")
        self.port = int(m.group(1))
        return self


ROOT = Path(__file__).resolve().parents[1]


class Load:
    """The load process; its events and progress files in `dir`."""

    def __init__(self, tcp_port: int, http_port: int, args: argparse.Namespace,
                 workdir: Path) -> None:
        self.dir = workdir
        self.log = workdir / "load.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_load",
                 "--tcp-port", str(tcp_port), "--http-port", str(http_port), "--out", str(workdir),
                 "--streams", str(args.streams), "--http-clients", str(args.http_clients),
                 "--slow-ms", args.slow_ms, "--timeout", str(args.client_timeout),
                 "--seed", str(args.seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        if read_line(self.proc.stdout, 20.0, "load", self.log) != "ready":
            raise RuntimeError("load did not start")

    def progress(self) -> dict[str, int]:
        try:
            data = json.loads((self.dir / "progress.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.items() if not k.endswith("_closed")}

    def closed(self) -> dict[str, int]:
        try:
            data = json.loads((self.dir / "progress.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.items() if k.endswith("_closed")}

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.dir / "events.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [json.loads(x) for x in lines if x.strip()]

    def stop(self) -> None:
        p = self.proc
        if p.poll() is None and p.stdin is not None:
            with contextlib.suppress(OSError):
                p.stdin.write(b"stop\n")
                p.stdin.flush()
            assert p.stdout is not None
            with contextlib.suppress(RuntimeError):
                read_line(p.stdout, 15.0, "load", self.log)
        stop_popen(p, 5.0)
        for s in (p.stdin, p.stdout):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()


# =================================================================================================
# Watching the proxy: its log and its processes
# =================================================================================================

LINE_RX = re.compile(r"^(\S+) level=(\w+) event=(\S+) gen=(\d+) pid=(\d+)(.*)$")
FIELD_RX = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass
class Line:
    n: int  # index in LogWatch.lines
    t: float
    event: str
    pid: int
    fields: dict[str, str]
    raw: str


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
        line = Line(len(self.lines), t, m.group(3), int(m.group(5)), fields, text)
        self.lines.append(line)
        self.pids.add(line.pid)
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
    pidfile: int
    good: bool  # exactly one serving and the pidfile names it
    titles_serving: int  # processes whose title says "serving" (a cross-check)


class Sampler(threading.Thread):
    """Every `interval` s: which generations serve. Runs in this process, never in the load's."""

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
        titles = sum(1 for p in live if proc_title(p).endswith(" serving"))
        return Sample(t, serving, pf, len(serving) == 1 and serving[0] == pf, titles)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.samples.append(self.sample())


# =================================================================================================
# The deployment
# =================================================================================================

class ChaosProxy(ProxyProcess):
    """ProxyProcess on fixed ports, restartable after a stop (same config dir, same log)."""

    def restart(self) -> None:
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        if self.proc is not None:
            self.retired.append(self.proc)
        self.start()

    retired: list[subprocess.Popen[bytes]]

    def stop_all(self, pids: set[int], keep_log: str | None = None) -> None:
        # A stopped process would not act on SIGTERM: continue them all first.
        for pid in pids | self.pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.pids |= pids
        if keep_log:
            with contextlib.suppress(OSError):
                shutil.copy(self.log, keep_log)
        self.stop()
        for p in self.retired:
            stop_popen(p, 1.0)


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


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = workdir
        self.echo = Helper("echo")
        self.http = ChaosHelper("_http")
        self.proxy: ChaosProxy | None = None
        self.watch: LogWatch | None = None
        self.sampler: Sampler | None = None
        self.load: Load | None = None
        self.records: list[Record] = []
        self.t_start = 0.0
        self.t_end = 0.0
        self.good_config = ""

    # ---- set-up and tear-down ------------------------------------------------------------------

    def start(self) -> None:
        self.echo.start()
        self.http.start()
        self.proxy = ChaosProxy(
            [{"name": "tcp", "listen": f"{LOOPBACK}:{free_port()}", "mode": "tcp",
              "upstream": "echo", "idle_timeout": 0.0},
             {"name": "web", "listen": f"{LOOPBACK}:{free_port()}", "mode": "http",
              "upstream": "web", "access_log": False}],
            {"echo": {"servers": [f"{LOOPBACK}:{self.echo.port}"]},
             "web": {"servers": [f"{LOOPBACK}:{self.http.port}"]}},
            proxy_opts={"drain_timeout": self.args.drain_timeout,
                        "upgrade_timeout": self.args.upgrade_timeout})
        self.proxy.retired = []
        self.good_config = self.proxy.config.read_text()
        self.proxy.start()
        self.watch = LogWatch(self.proxy.log)
        self.sampler = Sampler(self.watch, self.proxy.pidfile, self.args.sample_ms / 1000)
        self.sampler.start()
        self.load = Load(self.proxy.ports["tcp"], self.proxy.ports["web"], self.args,
                         self.workdir)
        self.wait_progress(10.0)

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        self.t_end = time.time()
        if self.sampler is not None:
            self.sampler.halt.set()
            self.sampler.join(timeout=5.0)
        if self.proxy is not None:
            self.restore_disk()
            pids = self.watch.pids if self.watch else set()
            self.proxy.stop_all(pids, self.args.keep_log)
            for pid in pids:  # generations orphaned to us (subreaper) and gone: no zombies
                alive(pid)
        self.http.stop()
        self.echo.stop()

    # ---- helpers -----------------------------------------------------------------------------

    @property
    def px(self) -> ChaosProxy:
        assert self.proxy is not None
        return self.proxy

    @property
    def w(self) -> LogWatch:
        assert self.watch is not None
        return self.watch

    def pidfile_pid(self) -> int:
        try:
            return int(self.px.pidfile.read_text().strip())
        except (OSError, ValueError):
            return 0

    def serving_pid(self) -> int:
        pid = self.pidfile_pid()
        return pid if pid and alive(pid) else 0

    def restore_disk(self) -> None:
        self.px.config.write_text(self.good_config)
        shutil.rmtree(self.px.dir / "proxy", ignore_errors=True)

    def wait_progress(self, timeout: float) -> list[str]:
        """Wait until every client did at least one more op; returns the ones that did not."""
        assert self.load is not None
        base = self.load.progress()
        deadline = time.monotonic() + timeout
        while True:
            now = self.load.progress()
            stuck = sorted(k for k in set(base) | set(now) if now.get(k, 0) <= base.get(k, 0))
            if not stuck or time.monotonic() > deadline:
                return stuck
            time.sleep(0.05)

    def wait_step(self, r: Record, mark: int, step: str, timeout: float) -> str:
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

        line = self.w.wait(reached, mark, timeout)
        if line is None or line.event == "upgrade_failed":
            return ""
        return "spawned" if line.event == "upgrade_spawned" else line.fields.get("phase", "")

    def await_outcome(self, r: Record, mark: int, timeout: float) -> str:
        """ok (another pid took over, stays alive and the pidfile names it), rolled back
        (upgrade_failed and the old pid still serves), stopped (nothing alive serves), or
        unknown. A takeover_serving is only a candidate: a fault may kill that generation right
        after it, and the old one then takes the service back."""
        deadline = time.monotonic() + timeout
        seen = mark
        candidate: Line | None = None
        while time.monotonic() < deadline:
            new = self.w.since(seen)
            seen += len(new)
            for line in new:
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
                    self.pidfile_pid() == candidate.pid and \
                    (not alive(r.old_pid) or self.old_phase(r.old_pid) in ("released", "done")):
                r.new_pid = candidate.pid
                r.successes += 1
                r.outcome_line = candidate.n
                return "ok"
            if not self.serving_pid() and not alive(r.old_pid):
                time.sleep(0.2)  # the pidfile may be switching right now
                if not self.serving_pid():
                    return "stopped"
            time.sleep(0.005)
        return "unknown"

    def check_takeback(self, r: Record, mark: int) -> None:
        """An old generation must never kill a successor that already serves (it owns the
        pairs it ACKed): look for upgrade_child_killed after that child's takeover_serving."""
        serving_at: dict[int, float] = {}
        for x in self.w.since(mark):
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

    def phase_at(self, r: Record, mark: int) -> str:
        """The old generation's phase when the fault hit, by the log's timestamps (ms): the
        step line we waited for is a few ms old by the time the fault lands."""
        phase = r.landed
        for x in self.w.since(mark):
            if x.t > r.t_fault:
                break
            if x.event == "phase" and x.pid == r.old_pid and \
                    PHASE_ORDER.get(x.fields.get("phase", ""), -1) > PHASE_ORDER.get(phase, -1):
                phase = x.fields.get("phase", "")
        return phase

    def old_phase(self, pid: int) -> str:
        with self.w.lock:
            return self.w.phase.get(pid, "")

    def settle(self, r: Record) -> None:
        """After an outcome: a generation serves (else start one), the others exit within
        drain_timeout (else they are strays: reported and killed), every client progresses."""
        if not self.serving_pid():
            # Bounded: whatever is left finishes its drain (or takes the service back).
            deadline = time.monotonic() + self.args.drain_timeout + self.args.upgrade_timeout + 5
            while time.monotonic() < deadline and self.sampler_live() and not self.serving_pid():
                time.sleep(0.05)
            if not self.serving_pid():
                self.wait_gone(self.args.drain_timeout + 3.0)
                self.restore_disk()
                self.px.restart()
                r.restarted = True
        deadline = time.monotonic() + self.args.drain_timeout + 3.0
        while time.monotonic() < deadline:
            if not [p for p in self.sampler_live() if p != self.serving_pid()]:
                break
            time.sleep(0.02)
        serving = self.serving_pid()  # never a stray, whatever happened meanwhile
        for pid in [p for p in self.sampler_live() if p != serving]:
            with self.w.lock:
                phase = self.w.phase.get(pid, "?")
            r.strays.append(f"pid {pid} ({proc_title(pid)!r}, state {proc_state(pid)}, "
                            f"last phase {phase})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            kill_pid(pid, timeout=2.0, sig=signal.SIGKILL)
        stuck = self.wait_progress(self.args.client_timeout)
        if stuck:
            r.problems.append(f"no progress within {self.args.client_timeout:g}s: {', '.join(stuck)}")

    def sampler_live(self) -> list[int]:
        assert self.sampler is not None
        return self.sampler.live_pids()

    def wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.sampler_live():
            time.sleep(0.05)

    # ---- one scheduled upgrade ---------------------------------------------------------------

    def run_one(self, r: Record) -> None:
        r.t0 = time.time()
        r.old_pid = self.serving_pid()
        mark = self.w.mark()
        a = self.args
        outcome_timeout = a.upgrade_timeout + 10.0
        if r.kind == "none":
            os.kill(r.old_pid, signal.SIGUSR2)
            r.outcome = self.await_outcome(r, mark, outcome_timeout)
        elif r.kind in ("kill9_new", "sigstop_new"):
            os.kill(r.old_pid, signal.SIGUSR2)
            r.landed = self.wait_step(r, mark, r.step, outcome_timeout)
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
                                   for x in self.w.since(mark))
                    if released:
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
            r.outcome = self.await_outcome(r, mark, outcome_timeout)
            if r.kind == "kill9_new" and r.t_fault:
                # Pairs the new generation had ACKed were its own: they die with it (no one
                # else holds their sockets). Only a kill after the handover began can cost any.
                for x in self.w.since(mark):
                    if x.event == "phase" and x.pid == r.old_pid and x.t <= r.t_fault and \
                            x.fields.get("phase") == "released":
                        r.new_held = int(x.fields.get("connections", "0"))
        elif r.kind in ("bad_config", "broken_module"):
            if r.kind == "bad_config":
                self.px.config.write_text(self.good_config + "\n[bogus]\nkey = 1\n")
            else:
                (self.px.dir / "proxy").mkdir(exist_ok=True)
                (self.px.dir / "proxy" / "__init__.py").write_text(
                    'raise ImportError("chaos: broken build on disk")\n')
            r.t_fault = time.time()
            os.kill(r.old_pid, signal.SIGUSR2)
            r.outcome = self.await_outcome(r, mark, outcome_timeout)
            self.restore_disk()
        elif r.kind == "garbage_peer":
            self.garbage_idle(r, mark)
            mark = self.w.mark()
            if r.step == "idle_then_signal":
                with self.held_peer():
                    r.t_fault = time.time()
                    os.kill(r.old_pid, signal.SIGUSR2)
                    time.sleep(0.3)
                r.landed = "idle"
                r.outcome = self.await_outcome(r, mark, outcome_timeout)
                if r.outcome == "unknown" and r.ignored:
                    r.outcome = "lost"
            else:
                os.kill(r.old_pid, signal.SIGUSR2)
                r.landed = self.wait_step(r, mark, r.step, outcome_timeout)
                r.t_fault = time.time()
                self.send_garbage(random_junk(self.rng))
                r.outcome = self.await_outcome(r, mark, outcome_timeout)
        elif r.kind == "usr2_storm":
            self.storm(r, mark, outcome_timeout)
        elif r.kind == "sigterm_handover":
            os.kill(r.old_pid, signal.SIGUSR2)
            r.landed = self.wait_step(r, mark, r.step, outcome_timeout)
            target = self.serving_pid()
            r.t_fault = time.time()
            if target:
                os.kill(target, signal.SIGTERM)
                r.notes.append(f"SIGTERM to pid {target} "
                               f"({'old' if target == r.old_pid else 'new'}) in phase {r.landed}")
            self.wait_gone(a.drain_timeout + a.upgrade_timeout + 5.0)
            left = self.sampler_live()
            r.outcome = "stopped" if not left else ("ok" if self.serving_pid() else "unknown")
            if left:
                r.problems.append(f"still running after the stop: {left}")
            failed = [x for x in self.w.since(mark) if x.event == "upgrade_failed"]
            if failed:
                r.notes.append(f"rolled back first: {failed[0].fields.get('reason', '')[:80]}")
        elif r.kind == "kill9_old_released":
            os.kill(r.old_pid, signal.SIGUSR2)
            # After `handed_over` the old generation holds only what cannot move yet (a
            # request in progress, a connect in flight). A kill right at RELEASED would take
            # every connection with it (nothing has moved then): the e2e tests cover that.
            line = self.w.wait(lambda ln: ln.event in ("handed_over", "upgrade_failed")
                               and ln.pid == r.old_pid, mark, outcome_timeout)
            r.landed = "handed_over" if line is not None and line.event == "handed_over" else ""
            if r.landed:
                r.t_fault = time.time()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.old_pid, signal.SIGKILL)
            r.outcome = self.await_outcome(r, mark, outcome_timeout)
            if r.outcome == "ok" and r.new_pid:
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline and self.serving_pid() != r.new_pid:
                    time.sleep(0.01)
                if self.serving_pid() != r.new_pid:
                    r.problems.append(f"new pid {r.new_pid} not serving after the old was killed")
        if r.outcome == "ok" and r.new_pid:
            deadline = time.monotonic() + 3.0  # the pidfile is written just before the line
            while time.monotonic() < deadline and self.serving_pid() != r.new_pid:
                time.sleep(0.005)
            if self.serving_pid() != r.new_pid:
                r.problems.append(f"takeover_serving from {r.new_pid} but the pidfile names "
                               f"{self.pidfile_pid()}")
        if r.t_fault and r.landed and r.landed != "idle":
            r.landed = self.phase_at(r, mark)
        self.settle(r)
        self.check_takeback(r, mark)
        r.ignored = sum(1 for x in self.w.since(mark) if x.event == "upgrade_ignored")
        r.t1 = time.time()

    def storm(self, r: Record, mark: int, timeout: float) -> None:
        """5 SIGUSR2 within 100 ms, each to the pid the pidfile names at that moment. By the
        contract the first starts an upgrade and the others, arriving during its handover, are
        queued and coalesced into one more upgrade right after it: 2 in all."""
        r.t_fault = time.time()
        for _ in range(5):
            pid = self.serving_pid()
            if pid:
                os.kill(pid, signal.SIGUSR2)
            time.sleep(0.02)
        r.outcome = self.await_outcome(r, mark, timeout)
        # Queued upgrades follow the first one's outcome: see each one through.
        after = r.outcome_line + 1
        for _ in range(6):
            if after <= 0:
                break
            nxt = self.w.wait(lambda x: x.event == "upgrade_spawned", after, 3.0)
            if nxt is None:
                break
            sub = Record(r.idx, r.kind, r.step, old_pid=nxt.pid)
            if self.await_outcome(sub, nxt.n, timeout) == "ok":
                r.new_pid = sub.new_pid
            r.successes += sub.successes
            after = sub.outcome_line + 1
        spawns = [x for x in self.w.since(mark) if x.event == "upgrade_spawned"]
        r.notes.append(f"{len(spawns)} upgrade(s) started, {r.successes} succeeded")
        if r.successes != 2:
            r.problems.append(f"{r.successes} upgrade(s) carried out; contract: 2 (the first, "
                              f"then the other signals queued and coalesced into one)")

    # ---- the takeover channel ------------------------------------------------------------------

    def channel(self) -> Path:
        return self.px.dir / "proxy.takeover"

    def send_garbage(self, junk: bytes) -> None:
        """Connect to the takeover socket, send `junk`, hang up; bounded."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            try:
                s.connect(str(self.channel()))
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                s.recv(100)
            except OSError:
                pass

    def garbage_idle(self, r: Record, mark: int) -> None:
        for junk in garbage_corpus(self.rng):
            self.send_garbage(junk)
        dropped = self.w.wait(lambda x: x.event in ("takeover_peer_dropped",
                                                    "takeover_peer_refused"), mark, 5.0)
        if dropped is None:
            r.problems.append("idle garbage: no takeover_peer_dropped line within 5 s")
        # Let the last dropped session end before the upgrade (that case is idle_then_signal).
        self.w.wait(lambda x: x.event == "phase" and x.pid == r.old_pid
                    and x.fields.get("phase") == "serving", mark, 2.0)

    @contextlib.contextmanager
    def held_peer(self) -> Iterator[None]:
        """A peer that sends half a HELLO frame and holds the channel's one session slot."""
        from proxy.frames import encode
        from proxy.takeover import MsgType

        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(2.0)
            with contextlib.suppress(OSError):
                s.connect(str(self.channel()))
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


# =================================================================================================
# Analysis and report
# =================================================================================================

@dataclass
class Row:
    kind: str
    count: int = 0
    ok: int = 0
    rolled_back: int = 0
    stopped: int = 0
    other: int = 0
    errors: int = 0  # unexpected client-visible errors
    expected: int = 0  # during a stop, or held by an old generation killed -9
    max_serving: int = 0  # confirmed (longer than --confirm-ms)
    blips: int = 0  # shorter 2-serving episodes (log order)
    zero_samples: int = 0
    longest_zero_ms: float = 0.0
    worst_stall_ms: float = 0.0
    strays: int = 0
    samples: int = 0


def window_of(records: list[Record], t: float) -> Record | None:
    for r in records:
        if r.t0 <= t < r.t1:
            return r
    # Between two upgrades (settle -> next t0 is short): the later one's doing is unlikely,
    # the earlier one's lingering effects likely.
    before = [r for r in records if r.t1 <= t]
    return before[-1] if before else None


def analyse(soak: Soak) -> tuple[list[Row], list[str], dict[str, Any]]:
    args = soak.args
    records = soak.records
    if records:
        records[-1].t1 = max(records[-1].t1, soak.t_end)
    rows: dict[str, Row] = {k: Row(k) for k in ["none", *KINDS]}
    warm = Row("(before the first upgrade)")
    problems: list[str] = []
    error_list: list[dict[str, Any]] = []
    for r in records:
        row = rows[r.kind]
        row.count += 1
        if r.outcome == "ok":
            row.ok += 1
        elif r.outcome == "rolled back":
            row.rolled_back += 1
        elif r.outcome == "stopped":
            row.stopped += 1
        else:
            row.other += 1
        row.strays += len(r.strays)
        label = f"upgrade {r.idx + 1} ({r.kind}" + (f"@{r.step}" if r.step else "") + \
            (f", landed in {r.landed}" if r.landed and r.landed != r.step else "") + ")"
        for s in r.strays:
            problems.append(f"{label}: stray process after drain_timeout: {s}")
        problems.extend(f"{label}: {p}" for p in r.problems)
        want = expected_outcome(r)
        if want and r.outcome not in want:
            problems.append(f"{label}: outcome {r.outcome!r}, expected {' or '.join(want)}"
                            + (f" ({'; '.join(r.notes)})" if r.notes else ""))
        if r.ignored:
            problems.append(f"{label}: {r.ignored} SIGUSR2 ignored (event=upgrade_ignored); "
                            f"contract: queued and carried out after the handover, coalesced")
        if r.restarted and r.kind != "sigterm_handover":
            problems.append(f"{label}: nothing served afterwards; a fresh proxy was started")
    assert soak.load is not None
    for ev in soak.load.events():
        # A timeout is seen late: it belongs where the op started. Anything else is seen at once.
        w = window_of(records, ev["t_op"] if ev.get("timeout") else ev["t"])
        row = rows[w.kind] if w is not None else warm
        if ev["type"] == "stall":
            row.worst_stall_ms = max(row.worst_stall_ms, ev["s"] * 1000)
            continue
        why = ""
        if w is not None and (w.outcome == "stopped" or w.restarted):
            why = "service stopped"
        elif w is not None and w.kind == "kill9_new" and w.new_held > 0 and \
                ev["t_op"] < w.t_fault + 0.05 and ev["t"] >= w.t_fault:
            w.new_held -= 1
            why = "held by the killed new generation"
        elif w is not None and w.kind == "kill9_old_released" and w.t_fault and \
                ev["t_op"] < w.t_fault <= ev["t"] and held_by_old(ev["client"]):
            why = "held by the old generation"
        if why:
            row.expected += 1
        else:
            row.errors += 1
        error_list.append({**ev, "upgrade": w.idx + 1 if w else 0,
                           "kind": w.kind if w else "", "expected": why})
    assert soak.sampler is not None
    confirm = args.confirm_ms / 1000
    samples = soak.sampler.samples
    episode: list[Sample] = []
    zero_run: list[Sample] = []

    def close_episode() -> None:
        if not episode:
            return
        w = window_of(records, episode[0].t)
        row = rows[w.kind] if w is not None else warm
        n = max(len(s.serving) for s in episode)
        if episode[-1].t - episode[0].t >= confirm:
            row.max_serving = max(row.max_serving, n)
            problems.append(f"{n} generations serving for {(episode[-1].t - episode[0].t) * 1000:.0f}"
                            f" ms from {episode[0].t - soak.t_start:.2f}s (pids {episode[0].serving})")
        else:
            row.blips += 1
        episode.clear()

    def close_zero() -> None:
        if not zero_run:
            return
        w = window_of(records, zero_run[0].t)
        row = rows[w.kind] if w is not None else warm
        row.longest_zero_ms = max(row.longest_zero_ms, (zero_run[-1].t - zero_run[0].t) * 1000
                                  + args.sample_ms)
        zero_run.clear()

    for smp in samples:
        w = window_of(records, smp.t)
        row = rows[w.kind] if w is not None else warm
        row.samples += 1
        row.max_serving = max(row.max_serving, min(1, len(smp.serving)))
        if len(smp.serving) >= 2:
            episode.append(smp)
        else:
            close_episode()
        if not smp.good and len(smp.serving) < 2:
            row.zero_samples += 1
            zero_run.append(smp)
        else:
            close_zero()
    close_episode()
    close_zero()
    titles2 = sum(1 for s in samples if s.titles_serving >= 2)
    if titles2:
        problems.append(f"{titles2} samples with 2+ processes titled '... serving' (the old "
                        f"generation keeps that title after RELEASED while it drains)")
    out = [rows["none"], *[rows[k] for k in KINDS]]
    if warm.errors or warm.expected or warm.max_serving != 1:
        out.insert(0, warm)
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": machine_note(),
        "rows": [asdict(x) for x in out],
        "upgrades": [asdict(r) for r in records],
        "errors": error_list,
        "problems": problems,
        "keepalive_closed_by_proxy": soak.load.closed(),
        "seconds": round(soak.t_end - soak.t_start, 1),
    }
    return out, problems, result



def held_by_old(client: str) -> bool:
    """Clients whose op may still be in the old generation after RELEASED: an http request
    completes where it started; a short connection may still be connecting upstream there."""
    return client in ("short", "slow") or client.startswith("http")


def expected_outcome(r: Record) -> list[str]:
    """What the contract promises for this fault (empty: nothing definite)."""
    if r.kind in ("none", "garbage_peer", "usr2_storm", "kill9_old_released"):
        return ["ok"]
    if r.kind in ("bad_config", "broken_module"):
        return ["rolled back"]
    if r.kind in ("kill9_new", "sigstop_new"):
        if not r.landed:
            return []
        return ["rolled back"] if PHASE_ORDER.get(r.landed, 9) < 4 else []
    if r.kind == "sigterm_handover":
        return ["stopped"]
    return []


def report(rows: list[Row], problems: list[str], result: dict[str, Any], soak: Soak) -> None:
    table = []
    for x in rows:
        if not x.count and x.kind != "none" and not x.errors:
            continue
        table.append([x.kind, x.count, x.ok, x.rolled_back, x.stopped, x.other, x.errors,
                      x.expected, x.max_serving, x.blips, x.zero_samples,
                      fmt(x.longest_zero_ms, 0), fmt(x.worst_stall_ms, 0), x.strays])
    tot = Row("total")
    for x in rows:
        for k in ("count", "ok", "rolled_back", "stopped", "other", "errors", "expected",
                  "blips", "zero_samples", "strays", "samples"):
            setattr(tot, k, getattr(tot, k) + getattr(x, k))
        tot.max_serving = max(tot.max_serving, x.max_serving)
        tot.longest_zero_ms = max(tot.longest_zero_ms, x.longest_zero_ms)
        tot.worst_stall_ms = max(tot.worst_stall_ms, x.worst_stall_ms)
    table.append([tot.kind, tot.count, tot.ok, tot.rolled_back, tot.stopped, tot.other,
                  tot.errors, tot.expected, tot.max_serving, tot.blips, tot.zero_samples,
                  fmt(tot.longest_zero_ms, 0), fmt(tot.worst_stall_ms, 0), tot.strays])
    a = soak.args
    print_table(f"Chaos soak: {len(soak.records)} upgrades in {result['seconds']:g}s, seed "
                f"{a.seed}, upgrade_timeout {a.upgrade_timeout:g}s, drain_timeout "
                f"{a.drain_timeout:g}s, {tot.samples} samples every {a.sample_ms:g} ms "
                f"({machine_note()})",
                ["fault", "count", "ok", "rolled back", "stopped", "other", "errors",
                 "expected", "max serving", "2-blips", "0-samples", "longest 0 ms",
                 "worst stall ms", "strays"], table)
    print("errors: client-visible (sequence gap/dup/reorder, EOF/reset, failed or wrong http "
          "response, failed short connection) not excused; expected: during a stop, or ops "
          "the old generation held when killed -9; max serving: most generations serving at "
          f"once for over {a.confirm_ms:g} ms; 2-blips: shorter overlaps (log order at the "
          "switch); 0-samples: nobody serving or the pidfile not naming the one serving")
    errs = result["errors"]
    unexpected = [e for e in errs if not e["expected"]]
    for e in unexpected[:12]:
        print(f"error: upgrade {e['upgrade']} ({e['kind']}) {e['client']}: {e['what']}")
    if len(unexpected) > 12:
        print(f"... and {len(unexpected) - 12} more errors")
    closed = result["keepalive_closed_by_proxy"]
    if closed:
        print(f"keep-alive connections closed by the proxy (Connection: close): {closed}")
    for p in problems[:40]:
        print(f"problem: {p}")
    if len(problems) > 40:
        print(f"... and {len(problems) - 40} more problems")


# =================================================================================================
# main
# =================================================================================================

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
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        return load_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_http":
        return http_backend_main()
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
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="stop scheduling upgrades after this long (3600)")
    args = ap.parse_args()
    become_subreaper()
    say(machine_note())
    rng = random.Random(args.seed)
    plan = schedule(args, rng)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"chaos-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    soak.rng = rng
    interrupted = ""
    try:
        soak.start()
        soak.t_start = time.time()
        for i, (kind, step) in enumerate(plan):
            if time.time() - soak.t_start > args.max_seconds:
                interrupted = f"stopped after {i} upgrades: --max-seconds {args.max_seconds:g}"
                break
            r = Record(i, kind, step)
            soak.records.append(r)
            if not soak.serving_pid():
                soak.px.restart()
                r.problems.append("nothing served before this upgrade; started a fresh proxy")
            soak.run_one(r)
            say(f"upgrade {i + 1}/{len(plan)} {kind}{'@' + step if step else ''}: {r.outcome}"
                f"{' (landed in ' + r.landed + ')' if r.landed and r.landed != step else ''}"
                f" pid {r.old_pid} -> {soak.serving_pid()}"
                f"{'; ' + '; '.join(r.notes) if r.notes else ''}")
            time.sleep(args.settle)
    except (RuntimeError, OSError) as exc:
        interrupted = f"aborted: {type(exc).__name__}: {exc}"
        say(interrupted)
    finally:
        soak.stop()
    if soak.load is None or soak.sampler is None:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"chaos soak did not start: {interrupted}")
        return 2
    rows, problems, result = analyse(soak)
    if interrupted:
        problems.insert(0, interrupted)
        result["problems"] = problems
    result["interrupted"] = interrupted
    report(rows, problems, result, soak)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(workdir, ignore_errors=True)
    bad = sum(x.errors for x in rows) or any(x.max_serving > 1 for x in rows) or interrupted
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
