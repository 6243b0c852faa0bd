"""Metrics: contract names render; snapshot/restore adds up and rejects malformed peer data."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.metrics import Metrics
from proxy.metrics import delta as _delta


def families(m: Metrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_contract_names_and_types() -> None:
    m = Metrics(generation=3, version=__version__)
    m.bytes.labels("web", "client_to_upstream").inc(10)
    m.http_request_duration.labels("web").observe(0.02)
    fams = families(m)
    expect = {
        "proxy_connections_accepted": "counter", "proxy_connections_active": "gauge",
        "proxy_bytes": "counter", "proxy_upstream_connect_failures": "counter",
        "proxy_http_requests": "counter", "proxy_http_request_duration_seconds": "histogram",
        "proxy_upgrades": "counter", "proxy_upgrade_duration_seconds": "histogram",
        "proxy_handover_connections": "counter", "proxy_generation": "gauge",
        "proxy_build_info": "gauge", "process_open_fds": "gauge",
    }
    for name, kind in expect.items():
        assert name in fams and fams[name].type == kind, name  # type: ignore[attr-defined]
    s = samples(m)
    assert s[("proxy_generation", ())] == 3
    assert s[("proxy_build_info", (("version", __version__),))] == 1
    assert s[("proxy_bytes_total", (("direction", "client_to_upstream"), ("listener", "web")))] == 10


def test_snapshot_restore_adds_counters_and_histograms() -> None:
    old, new = Metrics(), Metrics()
    old.connections_accepted.labels("web").inc(7)
    old.http_request_duration.labels("web").observe(0.003)
    old.connections_active.labels("web").inc(4)
    new.connections_accepted.labels("web").inc(2)
    new.restore(old.snapshot())
    s = samples(new)
    assert s[("proxy_connections_accepted_total", (("listener", "web"),))] == 9
    assert s[("proxy_http_request_duration_seconds_count", (("listener", "web"),))] == 1
    assert s[("proxy_http_request_duration_seconds_bucket", (("le", "0.005"), ("listener", "web")))] == 1
    assert ("proxy_connections_active", (("listener", "web"),)) not in s  # gauges are not carried


def test_delta_carries_only_what_was_counted_since() -> None:
    old, new = Metrics(), Metrics()
    old.connections_accepted.labels("web").inc(5)
    base = old.snapshot()
    new.restore(base)
    old.connections_accepted.labels("web").inc(2)
    old.connections_accepted.labels("api").inc(1)
    new.restore(_delta(old.snapshot(), base))
    s = samples(new)
    assert s[("proxy_connections_accepted_total", (("listener", "web"),))] == 7
    assert s[("proxy_connections_accepted_total", (("listener", "api"),))] == 1


@pytest.mark.parametrize("snap", [
    [], {"proxy_nope_total": []}, {"proxy_connections_accepted_total": [[["web"], -1]]},
    {"proxy_connections_accepted_total": [[["web", "x"], 1]]},
    {"proxy_connections_accepted_total": [[["web"], "1"]]},
    {"proxy_connections_accepted_total": [[["web"], float("nan")]]},
    {"proxy_http_request_duration_seconds": [[["web"], [[1], 1.0]]]},
    {"proxy_connections_active": [[["web"], 1]]},
])
def test_restore_rejects_malformed(snap: object) -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.restore(snap)
