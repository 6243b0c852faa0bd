"""Every metric, defined once; their exposition; snapshot/restore across generations.

The hot paths (a relay's per-read byte count, an accept) touch plain Python objects: a child
counter is an object with a float `value`, and `inc()` is one addition, with no lock (trio runs
one thread). A prometheus-client `Collector` on the generation's own `CollectorRegistry` turns
them into metric families at scrape time, beside the default process collector.

Continuity: `snapshot()` gives the counters' and histograms' values as plain JSON-able data; the
old generation sends it over the takeover channel and the new one `restore()`s it by *adding*
(the new generation may already have counted its own first connections). Gauges describe the
present and are not carried. `restore()` validates strictly: peer data is untrusted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPGRADE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Value:
    """One labelled child of a counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def dec(self, n: float = 1.0) -> None:
        self.value -= n

    def set(self, v: float) -> None:
        self.value = v


class HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.sum += v
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


class Family:
    """A metric family: name, help, label names and its children keyed by label values."""

    def __init__(self, kind: str, name: str, doc: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = ()) -> None:
        self.kind, self.name, self.doc, self.labelnames = kind, name, doc, tuple(labels)
        self.buckets = tuple(buckets)
        self.children: dict[tuple[str, ...], Any] = {}
        # False: left out of snapshot() while every value is 0, so a release that does not know
        # this family (a downgrade) can still take over from us (its restore() is strict).
        self.carry_if_zero = True

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = HistogramValue(self.buckets) if self.kind == "histogram" else Value()
            self.children[values] = child
        return child

    def collect(self) -> Metric:
        if self.kind == "histogram":
            hist = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
            for lv, h in self.children.items():
                cum, acc = [], 0.0
                for b, n in zip((*self.buckets, math.inf), h.counts, strict=True):
                    acc += n
                    cum.append((_le(b), acc))
                hist.add_metric(list(lv), cum, h.sum)
            return hist
        fam = (CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily)(
            self.name, self.doc, labels=self.labelnames)
        for lv, c in self.children.items():
            fam.add_metric(list(lv), c.value)
        return fam


def _le(b: float) -> str:
    return "+Inf" if b == math.inf else repr(float(b))


# What a generation counts as a whole rather than per connection: with workers, the supervisor's
# (see Upgrader._snapshot for the single process that is its own worker).
GENERATION_FAMILIES = frozenset({
    "proxy_upgrades_total", "proxy_upgrade_duration_seconds", "proxy_worker_restarts_total",
    "proxy_worker_lost_connections_total"})


class Metrics(Collector):
    """The generation's metrics. Attribute names mirror the contract's metric names."""

    def __init__(self, generation: int = 1, version: str = "") -> None:
        self.families: list[Family] = []
        self.extra: list[Metric] = []  # rendered as they are (a supervisor's per-worker families)
        f = self._family
        self.connections_accepted = f("counter", "proxy_connections_accepted_total",
                                      "Client connections accepted.", ["listener"])
        self.connections_active = f("gauge", "proxy_connections_active",
                                    "Client connections open now.", ["listener"])
        self.bytes = f("counter", "proxy_bytes_total", "Bytes relayed.", ["listener", "direction"])
        self.upstream_connect_failures = f(
            "counter", "proxy_upstream_connect_failures_total",
            "Failed connect attempts to an upstream server.", ["upstream", "server"])
        self.http_requests = f("counter", "proxy_http_requests_total",
                               "HTTP requests answered.", ["listener", "code"])
        self.http_request_duration = f(
            "histogram", "proxy_http_request_duration_seconds",
            "HTTP request duration, request head received to response end.", ["listener"],
            DURATION_BUCKETS)
        self.upgrades = f("counter", "proxy_upgrades_total", "Hot upgrades by result.", ["result"])
        self.upgrade_duration = f("histogram", "proxy_upgrade_duration_seconds",
                                  "SIGUSR2 to the new generation serving.", [], UPGRADE_BUCKETS)
        self.handover_connections = f("counter", "proxy_handover_connections_total",
                                      "Connections handed to the next generation.", ["mode"])
        self.generation = f("gauge", "proxy_generation", "This generation's number (1 first).")
        self.build_info = f("gauge", "proxy_build_info", "Build of the serving code.", ["version"])
        self.phase = f("gauge", "proxy_lifecycle_phase",
                       "1 for this generation's current lifecycle phase, 0 for the others.",
                       ["phase"])
        self.workers = f("gauge", "proxy_workers", "Worker processes this generation serves with.")
        # Only a supervisor (workers > 1) counts these; a family without children stays out of
        # snapshots, so a release that does not know them still restores ours.
        self.worker_connections = f("gauge", "proxy_worker_connections_active",
                                    "Client connections open now, by worker.", ["worker"])
        self.worker_restarts = f("counter", "proxy_worker_restarts_total",
                                 "Workers replaced by their generation, by reason.", ["reason"])
        self.worker_lost_connections = f(
            "counter", "proxy_worker_lost_connections_total",
            "Connections a worker held when it died (they died with it).")
        # Host migration (migrate.py): the receiving proxy counts success and the connections
        # it resumed; the giving one counts failures (on success it exits).
        self.migrations = f("counter", "proxy_migrations_total", "Host migrations by result.",
                            ["result"])
        self.migrated_connections = f("counter", "proxy_migrated_connections_total",
                                      "Connections received by host migration and resumed.")
        self.migrated_connections.labels()
        self.migrations.carry_if_zero = self.migrated_connections.carry_if_zero = False
        for result in ("success", "failed"):
            self.migrations.labels(result)
        self.generation.labels().set(generation)
        self.workers.labels().set(1)
        self.build_info.labels(version).set(1)
        for result in ("success", "failed"):
            self.upgrades.labels(result)
        self.upgrade_duration.labels()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProcessCollector(registry=None))
        self.registry.register(self)

    def set_phase(self, phase: str) -> None:
        for lv, child in self.phase.children.items():
            child.set(1.0 if lv == (phase,) else 0.0)
        self.phase.labels(phase).set(1.0)

    def _family(self, kind: str, name: str, doc: str, labels: Sequence[str] = (),
                buckets: Sequence[float] = ()) -> Family:
        fam = Family(kind, name, doc, labels, buckets)
        self.families.append(fam)
        return fam

    def collect(self) -> Iterator[Metric]:
        for fam in self.families:
            yield fam.collect()
        yield from self.extra

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        return self.render()

    @staticmethod
    def process_samples() -> dict[str, float]:
        """This process's `process_*` samples, for a worker's report to its supervisor."""
        return {s.name: s.value for fam in ProcessCollector(registry=None).collect()
                for s in fam.samples}

    # ---- continuity across generations ------------------------------------------------------

    def snapshot(self, families: frozenset[str] | None = None, exclude: bool = False
                 ) -> dict[str, list[Any]]:
        """Counters and histograms as {name: [[labels, value-or-[counts, sum]], ...]}; only
        those named in `families` (or, with `exclude`, all but those)."""
        out: dict[str, list[Any]] = {}
        for fam in self.families:
            if not fam.children or (families is not None and (fam.name in families) == exclude):
                continue
            if not fam.carry_if_zero and not any(
                    getattr(c, "value", 1) for c in fam.children.values()):
                continue
            if fam.kind == "counter":
                out[fam.name] = [[list(lv), c.value] for lv, c in fam.children.items()]
            elif fam.kind == "histogram":
                out[fam.name] = [[list(lv), [list(h.counts), h.sum]]
                                 for lv, h in fam.children.items()]
        return out

    def active(self) -> dict[str, float]:
        """`proxy_connections_active` by listener: what a worker reports to its supervisor."""
        return {lv[0]: c.value for lv, c in self.connections_active.children.items()}

    def add_active(self, active: dict[str, float]) -> None:
        for listener, n in active.items():
            self.connections_active.labels(listener).inc(n)

    def restore(self, snap: object) -> None:
        """Add a peer's snapshot to our values. Raises ValueError on anything malformed,
        before changing anything."""
        plan: list[tuple[Any, object]] = []
        if not isinstance(snap, dict):
            raise ValueError("metrics snapshot: not an object")
        by_name = {f.name: f for f in self.families if f.kind != "gauge"}
        for name, rows in snap.items():
            fam = by_name.get(name)
            if fam is None or not isinstance(rows, list):
                raise ValueError(f"metrics snapshot: unexpected family {name!r}")
            for row in rows:
                if (not isinstance(row, list) or len(row) != 2 or not isinstance(row[0], list)
                        or len(row[0]) != len(fam.labelnames)
                        or not all(isinstance(x, str) and len(x) < 256 for x in row[0])):
                    raise ValueError(f"metrics snapshot: bad row in {name}")
                val = row[1]
                if fam.kind == "counter":
                    _check_number(name, val)
                else:
                    if (not isinstance(val, list) or len(val) != 2 or not isinstance(val[0], list)
                            or len(val[0]) != len(fam.buckets) + 1):
                        raise ValueError(f"metrics snapshot: bad histogram in {name}")
                    for n in [*val[0], val[1]]:
                        _check_number(name, n)
                plan.append((fam.labels(*row[0]), val))
        for child, val in plan:
            if isinstance(child, HistogramValue):
                assert isinstance(val, list)
                child.counts = [a + b for a, b in zip(child.counts, val[0], strict=True)]
                child.sum += val[1]
            else:
                assert isinstance(val, int | float)
                child.inc(val)


def _check_number(name: str, v: object) -> None:
    try:
        ok = (not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
              and v >= 0)
    except OverflowError:  # an int too big for a float
        ok = False
    if not ok:
        raise ValueError(f"metrics snapshot: bad value in {name}")


def merged(*snaps: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The sum of snapshots (each as `Metrics.restore` takes it). Raises ValueError."""
    total = Metrics()
    for snap in snaps:
        total.restore(snap)
    return total.snapshot()


def delta(now: dict[str, list[Any]], base: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """What was counted between two snapshots of the same registry (`base` first): what an old
    generation sends in DONE for what it counted after RELEASED."""
    out: dict[str, list[Any]] = {}
    for name, rows in now.items():
        before = {tuple(lv): v for lv, v in base.get(name, [])}
        diff = []
        for lv, v in rows:
            b = before.get(tuple(lv))
            if isinstance(v, list):
                bc, bs = b if b is not None else ([0.0] * len(v[0]), 0.0)
                diff.append([lv, [[x - y for x, y in zip(v[0], bc, strict=True)], v[1] - bs]])
            else:
                diff.append([lv, v - (b or 0.0)])
        out[name] = diff
    return out
