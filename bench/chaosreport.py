"""The chaos soak's analysis and report: per fault kind, how the upgrades ended, the client
errors (each charged to the upgrade under way, or excused), how many generations served at
once, the worst stall; printed as a table, and returned as a machine-readable result.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from bench.chaosdeploy import Deployment
from bench.chaosfaults import KINDS
from bench.chaosoutcome import PHASE_ORDER, Record
from bench.chaoswatch import Sample
from bench.common import fmt, machine_note, print_table


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


def analyse(d: Deployment, records: list[Record]) -> tuple[list[Row], list[str], dict[str, Any]]:
    """The table's rows, the problems found, and the machine-readable result."""
    args = d.args
    if records:
        records[-1].t1 = max(records[-1].t1, d.t_end)
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
    assert d.load is not None
    for ev in d.load.events():
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
                w.t_fault <= ev["t"] and (ev["t_op"] < w.t_fault + 0.05 or (
                    args.workers > 1 and ev["t"] <= w.t_fault + args.drain_timeout + 1.0)):
            # (with workers the killed supervisor's workers finish what they had taken, up to
            # drain_timeout, instead of dying with it: a connection they held may end then)
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
    assert d.sampler is not None
    confirm = args.confirm_ms / 1000
    samples = d.sampler.samples
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
                            f" ms from {episode[0].t - d.t_start:.2f}s (pids {episode[0].serving})")
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
        "keepalive_closed_by_proxy": d.load.closed(),
        "seconds": round(d.t_end - d.t_start, 1),
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


def report(rows: list[Row], problems: list[str], result: dict[str, Any],
           a: argparse.Namespace) -> None:
    table = []
    for x in rows:
        if not x.count and x.kind != "none" and not x.errors:
            continue
        table.append([x.kind, x.count, x.ok, x.rolled_back, x.stopped, x.other, x.errors,
                      x.expected, x.max_serving, x.blips, x.zero_samples,
                      fmt(x.longest_zero_ms, 0), fmt(x.worst_stall_ms, 0), x.strays])
    chosen = a.kinds.split(",") if a.kinds else KINDS
    for k in KINDS:
        if k not in chosen:
            table.append([f"{k} (not scheduled: --kinds)", *["-"] * 13])
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
    print_table(f"Chaos soak: {len(result['upgrades'])} upgrades in {result['seconds']:g}s, "
                f"{a.workers} worker(s) per generation, seed {a.seed}, upgrade_timeout "
                f"{a.upgrade_timeout:g}s, drain_timeout "
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
