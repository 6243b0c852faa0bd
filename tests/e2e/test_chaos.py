"""The chaos soak, short: 15 upgrades under mixed load with every fault kind at least once.

Runs bench/chaos.py as a subprocess (it starts its own backends, proxy and load, each by pid,
and stops them all), bounded by a timeout, and reads its --json result. See bench/chaos.py for
what each fault does and how "serving" is sampled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.chaosfaults import KINDS
from tests.support.proc import ROOT

UPGRADES = 15
SEED = 1  # with --faults-all every kind is scheduled whatever the seed; fixed for repeatability
TIMEOUT = 240.0


def run_soak(tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--upgrades", str(UPGRADES),
           "--seed", str(SEED), "--faults-all", "--fault-rate", "0",
           # Shorter slow responses: each upgrade waits for the old generation to finish its
           # request and exit, so this bounds the run's length.
           "--slow-ms", "300-1000", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.exists(), f"no result (exit {res.returncode}):\n{res.stdout}\n{res.stderr[-3000:]}"
    result: dict[str, object] = json.loads(out.read_text())
    result["_report"] = res.stdout
    return result


def test_chaos_soak_short(tmp_path: Path) -> None:
    result = run_soak(tmp_path)
    report = str(result["_report"])
    assert not result["interrupted"], report
    rows = {r["kind"]: r for r in result["rows"]}  # type: ignore[attr-defined]
    # Every fault kind was exercised.
    assert all(rows[k]["count"] >= 1 for k in KINDS), report
    # No client-visible error for a fault that left a generation serving (errors during a
    # graceful stop, or of requests a killed old generation still held, are counted apart).
    assert sum(r["errors"] for r in rows.values()) == 0, report
    # Never two serving generations.
    assert max(r["max_serving"] for r in rows.values()) <= 1, report
