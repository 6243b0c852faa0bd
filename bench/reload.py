"""Requests lost to reloads: wrk keep-alive load through a proxy while it is reloaded N times.

Backend: nginx (one process, `return 200`, 6-byte body). For each system, one wrk run
(`-t2 -c50 --latency`, `--duration` s) and, from 1 s into it, `--reloads` reloads spread over
the run, each waited for (new process serving, old process gone) before the next; wrk runs on
(stopped with SIGINT, which makes it report) until 1 s after the last reload completed, so a
system whose reloads are slow gets a longer run rather than fewer reloads:
  * our proxy, mode http (`access_log = false`): `kill -USR2 <pid in the pidfile>`, then wait
    for the pidfile to name the new generation and the old pid to exit;
  * HAProxy, mode http, master-worker (`haproxy -W`, keep-alive both sides):
    `kill -USR2 <master pid>`, then wait for a new worker and the old worker's exit;
  * nginx as an HTTP/1.1 keep-alive reverse proxy (master + 1 worker): `kill -HUP <master>`,
    then wait the same way (`--no-nginx` skips it).
Errors are wrk's: socket errors (connect, read, write, timeout: a response slower than wrk's
`--timeout`, 2 s) and "Non-2xx or 3xx responses". A read error is what a client sees when a
keep-alive connection is closed under it (wrk has sent its next request by then).

Exits 1 when our proxy lost anything (any error) or did not complete every upgrade.
Everything runs on 127.0.0.1 and is stopped by pid (a proxy generation, HAProxy's and nginx's
workers too); every wait has a deadline. All of it shares this machine's cores.

    python bench/reload.py --quick      # 12 s of load per system, 10 reloads each
    python bench/reload.py              # 20 s of load per system, 10 reloads each
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/X.py`: import siblings as bench.X, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # `http` be the stdlib's, not ours

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import (
    LOOPBACK,
    Nginx,
    ProxyProcess,
    become_subreaper,
    ensure_tools,
    fmt,
    print_table,
    say,
    started,
)
from bench.httpcommon import (
    HAProxyHttp,
    MasterWorker,
    NginxProxy,
    WrkResult,
    WrkRun,
    http_proxy,
    load_note,
    wrk_cmd,
)


@dataclass
class Outcome:
    system: str
    how: str
    res: WrkResult
    reloads: int  # completed while wrk ran
    new_ms: list[float] = field(default_factory=list)  # signal -> new process serving
    old_ms: list[float] = field(default_factory=list)  # signal -> old process(es) gone
    failures: list[str] = field(default_factory=list)


def under_load(system: str, how: str, port: int, args: argparse.Namespace,
               reload: Callable[[], tuple[float, float]]) -> Outcome:
    """wrk under `reload()` args.reloads times, planned evenly from 1 s to args.duration - 1 s,
    each waited for before the next; wrk is stopped (SIGINT: it prints its report) 1 s after
    the last reload or at args.duration, whichever is later (so slow reloads all get load).
    `reload()` returns (new_ms, old_gone_ms)."""
    say(f"{system}: wrk -t{args.threads} -c{args.connections} ~{args.duration:g}s with "
        f"{args.reloads} reloads ({how})")
    out = Outcome(system, how, WrkResult(0, 0.0, 0.0, 0.0, 0.0), 0)
    cap = args.duration + 10.0 * args.reloads  # wrk's own -d: a bound, normally cut short
    with WrkRun(port, cap, args.connections, args.threads) as load:
        t0 = time.monotonic()
        first, last = t0 + 1.0, t0 + args.duration - 1.0
        step = (last - first) / max(1, args.reloads - 1)
        for i in range(args.reloads):
            at = first + i * step
            now = time.monotonic()
            if now < at:
                time.sleep(at - now)
            if time.monotonic() > t0 + cap - 2.0:
                out.failures.append(f"reload {i + 1}: wrk's {cap:g} s are over")
                break
            try:
                new_ms, old_ms = reload()
            except RuntimeError as exc:
                out.failures.append(f"reload {i + 1}: {str(exc)[:2000]}")
                break
            out.reloads += 1
            out.new_ms.append(new_ms)
            out.old_ms.append(old_ms)
            say(f"  {system} reload {i + 1}: new serving {new_ms:.0f} ms, old gone {old_ms:.0f} ms")
        end = max(time.monotonic() + 1.0, t0 + args.duration)
        time.sleep(max(0.0, min(end, t0 + cap - 1.0) - time.monotonic()))
        load.interrupt()
        out.res = load.result()
    return out


def upgrade_ours(proxy: ProxyProcess) -> Callable[[], tuple[float, float]]:
    def reload() -> tuple[float, float]:
        up = proxy.upgrade(timeout=60.0, poll=0.005)
        return up.serving_ms, up.exit_ms

    return reload


def reload_mw(server: MasterWorker) -> Callable[[], tuple[float, float]]:
    def reload() -> tuple[float, float]:
        r = server.reload()
        if r.new_ms != r.new_ms:
            raise RuntimeError(f"{server.name}: no new worker within {server.wait_new_timeout}s")
        if r.old_gone_ms != r.old_gone_ms:
            raise RuntimeError(f"{server.name}: old worker still there after "
                               f"{server.wait_old_timeout}s")
        return r.new_ms, r.old_gone_ms

    return reload


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} / {max(values):.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per system (20)")
    ap.add_argument("--quick", action="store_true", help="12 s of load per system")
    ap.add_argument("--reloads", type=int, default=10, help="reloads per system (10)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    ap.add_argument("--haproxy-threads", type=int, default=1, help="HAProxy nbthread (1)")
    ap.add_argument("--no-nginx", action="store_true", help="skip nginx")
    args = ap.parse_args()
    if args.quick:
        args.duration = 12.0
    if args.duration < 3 or args.reloads < 1:
        ap.error("need --duration >= 3 and --reloads >= 1")
    ensure_tools("wrk", "nginx", "haproxy")
    become_subreaper()
    note = load_note()
    say(note)

    outcomes: list[Outcome] = []
    backend = Nginx()
    with started(backend):
        addr = f"{LOOPBACK}:{backend.port}"
        ours = http_proxy(backend.port, args.connections)
        with started(ours):
            outcomes.append(under_load("our proxy (mode http)", "kill -USR2 <pidfile pid>",
                                       ours.ports["web"], args, upgrade_ours(ours)))
        haproxy = HAProxyHttp(addr, nbthread=args.haproxy_threads, master_worker=True)
        with started(haproxy):
            outcomes.append(under_load("HAProxy -W (mode http)", "kill -USR2 <master pid>",
                                       haproxy.port, args, reload_mw(haproxy)))
        if not args.no_nginx:
            nginx = NginxProxy(addr)
            with started(nginx):
                outcomes.append(under_load("nginx (proxy_pass, keepalive)", "kill -HUP <master pid>",
                                           nginx.port, args, reload_mw(nginx)))

    cmd = " ".join(a for a in wrk_cmd(0, args.duration, args.connections, args.threads)[1:-1]
                   if not a.startswith("-d"))
    print_table(
        f"{args.reloads} reloads under keep-alive load: wrk {cmd}, >= {args.duration:g} s (SIGINT "
        f"1 s after the last reload); 6-byte body; wrk, nginx and the proxy share the cores",
        ["system", "reload", "reloads", "seconds", "requests", "req/s", "connect", "read", "write",
         "timeout", "non-2xx", "errors", "new serving ms med/max", "old gone ms med/max"],
        [[o.system, o.how, f"{o.reloads}/{args.reloads}", fmt(o.res.seconds, 1), o.res.requests,
          fmt(o.res.rps, 0), o.res.connect, o.res.read, o.res.write, o.res.timeout, o.res.non2xx,
          o.res.errors, _ms(o.new_ms), _ms(o.old_ms)] for o in outcomes])
    print(note)
    for o in outcomes:
        for f in o.failures:
            print(f"{o.system}: {f}")
    mine = outcomes[0]
    ok = mine.res.errors == 0 and mine.reloads == args.reloads and mine.res.requests > 0
    print(f"\nour proxy: {mine.res.errors} errors in {mine.res.requests} requests across "
          f"{mine.reloads}/{args.reloads} upgrades -> {'OK (nothing lost)' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
