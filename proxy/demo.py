"""`python -m proxy demo`: a self-contained live demo of hot upgrades, no config needed.

It starts a built-in echo backend (in this process), the proxy (a real child process, config in
a temp dir), a few streaming clients that send sequence numbers through it and check each echo,
then upgrades the proxy several times with SIGUSR2 while the streams run. It prints the streams'
sequence numbers continuing across generations, each upgrade, and a summary; exit 0 when no
connection was lost and no sequence number skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from proxy import pidfile

STREAM_PACE = 0.02  # seconds between a stream's pings


async def echo_handler(stream: trio.SocketStream) -> None:
    """The demo's built-in backend: echo every byte back (tests use it too)."""
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@dataclass
class Stream:
    ident: int
    seq: int = 0
    max_stall: float = 0.0
    error: str = ""
    seen_pids: list[int] = field(default_factory=list)


async def _run_stream(s: Stream, port: int, stop: trio.Event, serving: list[int]) -> None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            buf = b""
            last = trio.current_time()
            while not stop.is_set():
                line = b"%d %d\n" % (s.ident, s.seq)
                with trio.fail_after(10):
                    await stream.send_all(line)
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            raise EOFError("connection closed")
                        buf += chunk
                got, buf = buf.split(b"\n", 1)
                if got + b"\n" != line:
                    raise ValueError(f"expected {line!r}, got {got!r}")
                now = trio.current_time()
                s.max_stall = max(s.max_stall, now - last)
                last = now
                if not s.seen_pids or s.seen_pids[-1] != serving[0]:
                    s.seen_pids.append(serving[0])
                    print(f"  stream {s.ident}: seq {s.seq:5d} -> echoed (serving pid {serving[0]})")
                s.seq += 1
                await trio.sleep(STREAM_PACE)
    except (OSError, EOFError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
        print(f"  stream {s.ident}: LOST at seq {s.seq}: {s.error}")


def _wait_line(log: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.02)
    raise TimeoutError(f"the proxy did not log {needle!r} within {timeout}s (log: {log})")


async def _demo(upgrades: int, streams: int, workdir: Path, workers: int = 1) -> int:
    log = workdir / "proxy.log"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
        backend_port = listeners[0].socket.getsockname()[1]
        cfg = workdir / "config.toml"
        cfg.write_text(
            "[proxy]\npidfile = \"proxy.pid\"\ntakeover_socket = \"proxy.takeover\"\n"
            f"drain_timeout = 10.0\nupgrade_timeout = 20.0\nworkers = {workers}\n\n"
            "[[listener]]\nname = \"demo\"\nlisten = \"127.0.0.1:0\"\nupstream = \"echo\"\n\n"
            f"[upstream.echo]\nservers = [\"127.0.0.1:{backend_port}\"]\n")
        with open(log, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        pids = {proc.pid}
        try:
            line = await trio.to_thread.run_sync(_wait_line, log, "event=listening", 20.0)
            port = int(line.split("addr=")[1].split()[0].rsplit(":", 1)[1])
            pf = workdir / "proxy.pid"
            serving = [pidfile.read(pf) or proc.pid]
            how = f", {workers} workers" if workers > 1 else ""
            print(f"proxy pid {serving[0]} (generation 1{how}) on 127.0.0.1:{port}, "
                  f"echo backend on :{backend_port}; log: {log}")
            stop = trio.Event()
            ss = [Stream(i + 1) for i in range(streams)]
            for s in ss:
                nursery.start_soon(_run_stream, s, port, stop, serving)
            await trio.sleep(1.0)
            for n in range(1, upgrades + 1):
                old = serving[0]
                t0 = time.monotonic()
                os.kill(old, signal.SIGUSR2)
                with trio.fail_after(30):
                    while True:
                        new = pidfile.read(pf)
                        if new and new != old and not pidfile.alive(old):
                            break
                        await trio.sleep(0.01)
                pids.add(new)
                serving[0] = new
                took = (time.monotonic() - t0) * 1000
                print(f"upgrade {n}: pid {old} -> {new} (generation {n + 1}) in {took:.0f} ms; "
                      f"old pid gone, {sum(1 for s in ss if not s.error)} streams still open")
                await trio.sleep(1.0)
            stop.set()
            await trio.sleep(STREAM_PACE * 3)
        finally:
            for pid in pids:
                if pidfile.alive(pid):
                    os.kill(pid, signal.SIGTERM)
            with trio.move_on_after(15):
                while any(pidfile.alive(p) for p in pids):
                    await trio.sleep(0.05)
            proc.poll()
            nursery.cancel_scope.cancel()
    lost = [s for s in ss if s.error]
    print("\nsummary")
    print(f"  upgrades:          {upgrades}")
    print(f"  streams:           {len(ss)}, each saw pids {' -> '.join(map(str, ss[0].seen_pids))}")
    print(f"  connections lost:  {len(lost)}")
    print(f"  sequence numbers:  {', '.join(f'#{s.ident}: 0..{s.seq - 1}' for s in ss)}"
          " (no gap, no duplicate)")
    print("  worst stall:       " + ", ".join(f"#{s.ident} {s.max_stall * 1000:.0f} ms" for s in ss))
    return 0 if not lost else 1



def main(upgrades: int = 3, streams: int = 4, workers: int = 1) -> int:
    with tempfile.TemporaryDirectory(prefix="proxy-demo-") as d:
        try:
            return trio.run(_demo, upgrades, streams, Path(d), workers)
        except (TimeoutError, trio.TooSlowError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
