"""The chaos soak's load: one trio process of clients, and the handle that runs it.

    python bench/chaosload.py --tcp-port N --http-port N --out DIR   # started by bench/chaos.py

Sequence-checked tcp streams, short tcp connections, http keep-alive clients, one Upgrade tunnel
with sequence checks, one client of a slow endpoint. It writes every client-visible error and
every stall over 100 ms, stamped with wall-clock time (the proxy's log uses it too), to
DIR/events.jsonl, and the ops done per client to DIR/progress.json. "stop" on stdin (or EOF)
ends it.
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
import subprocess
import time
import zlib
from collections.abc import Callable
from typing import Any

from bench.common import LOOPBACK, ROOT, read_line, stop_popen

STALL_S = 0.1  # ops slower than this are reported as stalls


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


# trio and h11 are imported where only the load process runs: the orchestrator imports this
# module for `Load` alone.
def _load_errors() -> tuple[type[BaseException], ...]:
    import h11
    import trio
    return (OSError, EOFError, Mismatch, ValueError, KeyError, trio.TooSlowError,
            trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


def main(argv: list[str]) -> int:
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

    async def run_clients() -> None:
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

    trio.run(run_clients)
    rec.close()
    print("done", flush=True)
    return 0


class Load:
    """The load process; its events and progress files in `dir`."""

    def __init__(self, tcp_port: int, http_port: int, args: argparse.Namespace,
                 workdir: Path) -> None:
        self.dir = workdir
        self.log = workdir / "load.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()),
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



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
