"""What counting bytes costs the relay: the same in-process transfers with the byte counters
wired to real metric children vs to no-ops, alternated in one run. Prints a table.

    python -m bench.counting [--rounds 5] [--pings 20000] [--bulk-mib 512]

Everything runs in one trio process on 127.0.0.1: a client, the Relay under test and an echo
sink, so the figures are the relay's own per-read/write overhead, not a proxy benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import socket
import statistics
import time
from collections.abc import Callable

import trio

from proxy.forward import Relay
from proxy.metrics import Metrics


def _pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


async def _run(pings: int, bulk: int, c2u: Callable[[int], None],
               u2c: Callable[[int], None]) -> tuple[float, float]:
    """(seconds for `pings` 64-byte round trips, seconds for `bulk` bytes one way)."""
    capp, cside = _pair()
    uside, uapp = _pair()
    ct, ut = trio.socket.from_stdlib_socket(capp), trio.socket.from_stdlib_socket(uapp)
    msg = b"x" * 64
    async with trio.open_nursery() as nursery:
        relay = Relay(cside, uside, count_c2u=c2u, count_u2c=u2c, spawn=nursery.start_soon)
        nursery.start_soon(relay.run)

        async def echo() -> None:
            for _ in range(pings):
                got = b""
                while len(got) < len(msg):
                    got += await ut.recv(64 - len(got))
                await ut.send(got)

        nursery.start_soon(echo)
        t0 = time.perf_counter()
        for _ in range(pings):
            await ct.send(msg)
            got = b""
            while len(got) < len(msg):
                got += await ct.recv(64 - len(got))
        t_ping = time.perf_counter() - t0

        block = b"y" * (1 << 20)

        async def sink() -> None:
            left = bulk
            while left:
                left -= len(await ut.recv(1 << 20))

        t0 = time.perf_counter()
        async with trio.open_nursery() as inner:
            inner.start_soon(sink)
            for _ in range(bulk >> 20):
                await _sendall(ct, block)
        t_bulk = time.perf_counter() - t0
        capp.close()
        uapp.close()
        nursery.cancel_scope.cancel()
    return t_ping, t_bulk


async def _sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=20000)
    ap.add_argument("--bulk-mib", type=int, default=512)
    args = ap.parse_args()
    m = Metrics()
    counted = (m.bytes.labels("web", "client_to_upstream").inc,
               m.bytes.labels("web", "upstream_to_client").inc)

    def noop(n: int) -> None:
        pass

    results: dict[str, list[tuple[float, float]]] = {"no-op": [], "counted": []}
    for _ in range(args.rounds):
        for name, fns in (("no-op", (noop, noop)), ("counted", counted)):
            results[name].append(trio.run(_run, args.pings, args.bulk_mib << 20, *fns))
    print(f"{'counters':10} {'pings/s':>10} {'bulk MiB/s':>11}   (median of {args.rounds} rounds)")
    base: tuple[float, float] | None = None
    for name, runs in results.items():
        ping = args.pings / statistics.median(r[0] for r in runs)
        bulk = args.bulk_mib / statistics.median(r[1] for r in runs)
        ratio = "" if base is None else f"   ratio {ping / base[0]:.3f} / {bulk / base[1]:.3f}"
        base = base or (ping, bulk)
        print(f"{name:10} {ping:10.0f} {bulk:11.0f}{ratio}")
    total = m.bytes.labels("web", "client_to_upstream").value
    print(f"(counted {total:.0f} client_to_upstream bytes in the counted rounds)")


if __name__ == "__main__":
    main()
