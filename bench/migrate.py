"""Host migration (TCP_REPAIR) cost: freeze time, per-connection cost and the clients' stall.

For each size N: network namespaces client / A / B / upstream on one bridge (the tests'
topology, tests/support/mignet.py), the real proxy on A and on B, N echo streams from the
client through A's tcp listener (each sends one `%08d\\n` line every `--pace`-ish seconds and
checks its echo), then `python -m proxy migrate` A -> B, then the streams run on for a while.

Columns:
  freeze      addresses removed on A -> B's report that every connection resumed (as A measures
              it, printed by `proxy migrate`: "migrated: N connections in X ms")
  B live      B's own part: RELEASED received -> every connection resumed (restore, addresses,
              ARP, repair off), and of it `restore` (the TCP_REPAIR restores + adoption)
  per conn    freeze / N (each connection = 2 sockets, client and upstream side)
  stall       over the streams, each stream's worst line round trip from just before
              `proxy migrate` to the end (p50 / p99 / max); a stream sends only every `pace`,
              so only those that sent during the freeze feel it: p99 and max are the figures
  resets      the client's and upstream's TcpEstabResets + TcpOutRsts, after - before
  replay      on: A re-sends to B what arrived for the moving addresses during the freeze
              (`proxy migrate` default); off: `--no-replay`, the peers retransmit on their own

Needs root and `ip netns`. Waits (bounded) while /tmp/BENCH_RUNNING exists.

    python bench/migrate.py                       # 100, 1000, 5000 pairs, replay on and off
    python bench/migrate.py --sizes 100,1000 --runs 3
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import re
import statistics
import time
from typing import Any

from tests.support.mignet import (
    HOSTS,
    MIG_PORT,
    SERVICE,
    TCP_PORT,
    NsProxy,
    Topology,
    mark,
    read_line,
    result,
    stop_helper,
    unavailable,
)

BENCH_FLAG = Path("/tmp/BENCH_RUNNING")


def wait_quiet(limit: float = 600.0) -> None:
    deadline = time.monotonic() + limit
    while BENCH_FLAG.exists():
        if time.monotonic() > deadline:
            raise SystemExit("someone is still benchmarking (/tmp/BENCH_RUNNING): giving up")
        time.sleep(2)


def counters(topo: Topology) -> int:
    c, u = topo.tcp_counters("cl"), topo.tcp_counters("up")
    return c["EstabResets"] + c["OutRsts"] + u["EstabResets"] + u["OutRsts"]


def one(n: int, pace: float, after: float, replay: bool) -> dict[str, Any]:
    topo = Topology(f"b{n}")
    procs: list[Any] = []
    proxies: list[NsProxy] = []
    try:
        servers = topo.spawn("up", "servers", HOSTS["up"])
        procs.append(servers)
        assert read_line(servers, 15) == "ready"
        a, b = NsProxy(topo, "a"), NsProxy(topo, "b")
        proxies += [a, b]
        a.start()
        b.start()
        load = topo.spawn("cl", "clients", SERVICE, str(TCP_PORT), "--streams", str(n),
                          "--http", "0", "--pace", str(pace))
        procs.append(load)
        assert read_line(load, 120) == "ready"
        time.sleep(max(1.0, pace * 2))  # every stream has sent a few lines
        before = counters(topo)
        mark(load)
        res = a.migrate(f"{HOSTS['b']}:{MIG_PORT}", timeout=120, replay=replay)
        if res.returncode != 0:
            raise RuntimeError(f"migrate failed: {res.stderr.strip()}")
        m = re.search(r"migrated: (\d+) connections in ([\d.]+) ms", res.stdout)
        assert m, res.stdout
        print("  A: " + " ".join(x.group(0) for x in re.finditer(
            r"phase=(freeze|committed|done) .*", a.text())), file=sys.stderr)
        live = b.wait_log(r"phase=live .*resumed=(\d+) restore_ms=([\d.]+) freeze_ms=([\d.]+)")
        time.sleep(after)
        resets = counters(topo) - before
        got = result(load, timeout=60)
        moved = int(m.group(1))
        freeze = float(m.group(2))
        return {"n": n, "replay": int(replay), "moved": moved, "freeze": freeze,
                "b_live": float(live.group(3)), "restore": float(live.group(2)),
                "per_conn": freeze / max(1, moved),
                "p50": got["rtt_p50"] * 1000, "p99": got["rtt_p99"] * 1000,
                "max": got["rtt_max"] * 1000, "errors": got["nerrors"], "resets": resets}
    finally:
        for p in procs:
            stop_helper(p)
        for px in proxies:
            px.stop()
        topo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,5000", help="pairs per run, comma-separated")
    ap.add_argument("--runs", type=int, default=1, help="runs per size (the table gives medians)")
    ap.add_argument("--pace", type=float, default=0.0,
                    help="seconds between a stream's lines (default: N/2000, 1,000 lines/s)")
    ap.add_argument("--after", type=float, default=2.0, help="seconds the streams run on after")
    ap.add_argument("--replay", default="on,off",
                    help="on, off or on,off: with and/or without the freeze's packets re-sent")
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"bench/migrate.py: {why}")
    rows = []
    for n, replay in ((int(x), r == "on") for x in args.sizes.split(",")
                      for r in args.replay.split(",")):
        runs = []
        for _ in range(args.runs):
            wait_quiet()
            runs.append(one(n, args.pace or max(0.05, n / 2000), args.after, replay))
            print(f"  run: {runs[-1]}", file=sys.stderr)
        rows.append({k: (statistics.median(r[k] for r in runs) if k not in ("errors", "resets")
                         else max(r[k] for r in runs)) for k in runs[0]})
    print(f"{'pairs':>6} {'replay':>6} {'moved':>6} {'freeze ms':>10} {'B live ms':>10} {'restore ms':>11} "
          f"{'per conn ms':>12} {'stall p50':>10} {'p99':>8} {'max':>8} {'errors':>7} "
          f"{'resets':>7}")
    for r in rows:
        print(f"{int(r['n']):>6} {'on' if r['replay'] else 'off':>6} {r['moved']:>6.0f} "
              f"{r['freeze']:>10.1f} {r['b_live']:>10.1f} {r['restore']:>11.1f} "
              f"{r['per_conn']:>12.3f} {r['p50']:>10.1f} {r['p99']:>8.1f} "
              f"{r['max']:>8.1f} {r['errors']:>7} {r['resets']:>7}")


if __name__ == "__main__":
    main()
