"""The deployment files (deploy/) and what systemd relies on at run time.

- deploy/proxy.service: `systemd-analyze verify` (and `security --offline`) when available,
  plus the settings a hot upgrade under systemd depends on.
- deploy/prometheus.yml and deploy/alerts.yml: `promtool check` and promtool rule unit tests
  when promtool is installed (Debian package `prometheus`); always a structural check with
  PyYAML, including that every metric an expression uses is one the proxy exports.
- sd_notify: the real proxy under a fake $NOTIFY_SOCKET sends MAINPID=<pid> and READY=1 when it
  starts, and the next generation sends its own after SIGUSR2 (and writes the pidfile): that is
  what lets systemd (Type=notify, NotifyAccess=all) follow the main process across a reload.

Every wait is bounded by a deadline; processes are stopped by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import config as proxy_config
from proxy.metrics import Metrics
from proxy.pidfile import alive
from tests.support.backends import dead_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "proxy.service"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
JOB = "proxy"

# The public contract's metric names (CONTRACT.md, "Metrics") and their types.
CONTRACT_METRICS = {
    "proxy_connections_accepted_total": "counter",
    "proxy_connections_active": "gauge",
    "proxy_bytes_total": "counter",
    "proxy_upstream_connect_failures_total": "counter",
    "proxy_http_requests_total": "counter",
    "proxy_http_request_duration_seconds": "histogram",
    "proxy_upgrades_total": "counter",
    "proxy_upgrade_duration_seconds": "histogram",
    "proxy_handover_connections_total": "counter",
    "proxy_generation": "gauge",
    "proxy_build_info": "gauge",
    "proxy_workers": "gauge",
    "proxy_migrations_total": "counter",
    "proxy_migrated_connections_total": "counter",
}
# Additions the README documents and an alert may use.
ADDED_METRICS = {"proxy_worker_restarts_total": "counter"}
# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                     "scrape_samples_post_metric_relabeling", "scrape_series_added"}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def run_tool(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


# ---- the systemd unit ---------------------------------------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; systemd allows a key more than once."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {raw!r}"
        assert section, f"{path}: {key} outside any section"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def one(settings: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = settings.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, got {values}"
    return values[0]


# `verify` checks that ExecStart's binary exists on *this* machine; a host without the
# deployment's interpreter is an environment fact, not an error in the unit.
MISSING_BINARY = re.compile(r"Command .+ is not executable: No such file or directory")
OTHER_UNIT_FILE = re.compile(r"^(/\S+?):\d+: ")


def verify_problems(unit: Path) -> list[str]:
    """The lines of `systemd-analyze verify` that are real problems with `unit`.

    verify exits 0 even for unknown keys and unparsable values (it logs them and ignores the
    line), so its output is what counts, not only its exit status.
    """
    res = run_tool("systemd-analyze", "verify", str(unit))
    problems = []
    for line in (res.stdout + res.stderr).splitlines():
        if not line.strip() or MISSING_BINARY.search(line):
            continue
        m = OTHER_UNIT_FILE.match(line)
        if m and Path(m.group(1)).name != unit.name:
            continue  # a complaint about some other unit installed on this host
        problems.append(line)
    if res.returncode != 0 and not problems and not MISSING_BINARY.search(res.stderr):
        problems.append(f"systemd-analyze verify exited {res.returncode} without a message")
    return problems


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)")


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify() -> None:
    assert verify_problems(UNIT) == []


@needs_systemd_analyze
def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    # The tolerance above must not hide real mistakes: an unknown key and a bad value.
    broken = tmp_path / UNIT.name
    text = UNIT.read_text().replace("KillMode=control-group", "KillMode=bogus\nKilMode=mixed")
    broken.write_text(text)
    problems = verify_problems(broken)
    assert any("bogus" in p for p in problems), problems
    assert any("KilMode" in p for p in problems), problems


@needs_systemd_analyze
def test_unit_hardening_exposure_stays_low() -> None:
    # Exposure 0.0 (locked down) .. 10.0 (unprotected); the unit scores about 2 ("OK").
    res = run_tool("systemd-analyze", "security", "--offline=yes", "--threshold=30", str(UNIT))
    if "--offline" in res.stderr and ("unrecognized" in res.stderr or "Unknown" in res.stderr):
        pytest.skip("this systemd-analyze has no offline security analysis (systemd < 250)")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


@needs_systemd_analyze
def test_readme_template_recipe_gives_a_valid_instance_unit(tmp_path: Path) -> None:
    # deploy/README.md turns proxy.service into proxy@.service with sed; apply the same
    # substitutions and verify an instance of the result.
    readme = (DEPLOY / "README.md").read_text()
    subs = re.findall(r"-e 's\|(.+?)\|(.+?)\|'", readme)
    assert len(subs) == 3, subs
    text = UNIT.read_text()
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n >= 1, f"README's s|{pattern}|{repl}| matches nothing in {UNIT.name}"
    instance = tmp_path / "proxy@edge.service"
    instance.write_text(text)
    s = unit_settings(instance)
    assert one(s, "Service", "PIDFile") == "/run/proxy/%i/proxy.pid"
    assert one(s, "Service", "RuntimeDirectory") == "proxy/%i"
    assert one(s, "Service", "ExecStart").endswith("--config /etc/proxy/%i.toml")
    assert verify_problems(instance) == []


def test_unit_settings_for_hot_upgrade() -> None:
    s = unit_settings()
    assert set(s) == {"Unit", "Service", "Install"}
    # systemd waits for READY=1 and accepts MAINPID= from the next generation (a child).
    assert one(s, "Service", "Type") == "notify"
    assert one(s, "Service", "NotifyAccess") == "all"
    start = one(s, "Service", "ExecStart").split()
    assert start[-5:] == ["-m", "proxy", "run", "--config", "/etc/proxy/config.toml"], start
    assert "--takeover" not in start
    reload_cmd = one(s, "Service", "ExecReload").split()
    assert reload_cmd[1:] == ["-USR2", "$MAINPID"] and reload_cmd[0].endswith("/kill")
    # The pidfile lives in the runtime directory systemd creates (and the config must say so).
    pid_path = Path(one(s, "Service", "PIDFile"))
    runtime_dir = one(s, "Service", "RuntimeDirectory")
    assert pid_path.parent == Path("/run") / runtime_dir
    # A stop drains every generation; a reload never involves KillMode.
    assert one(s, "Service", "KillMode") in ("control-group", "mixed")
    assert one(s, "Service", "Restart") == "on-failure"
    assert int(one(s, "Service", "LimitNOFILE")) >= 65536
    drain = proxy_config.load(ROOT / "config.toml").proxy.drain_timeout
    assert float(one(s, "Service", "TimeoutStopSec")) > drain
    # Hardening must leave the takeover channel (AF_UNIX + SCM_RIGHTS) and the network alone.
    families = one(s, "Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert not families[0].startswith("~")
    assert s["Service"].get("PrivateNetwork", ["no"]) == ["no"]
    assert s["Service"].get("PrivateUsers", ["no"]) == ["no"]
    assert one(s, "Service", "SystemCallFilter") == "@system-service"
    assert one(s, "Service", "SystemCallErrorNumber") == "EPERM"
    assert one(s, "Install", "WantedBy") == "multi-user.target"


def test_every_unit_setting_has_a_comment() -> None:
    # Each setting, or a block of related settings, sits right under a comment saying why.
    lines = [line.strip() for line in UNIT.read_text().splitlines()]

    def is_setting(line: str) -> bool:
        return bool(line) and not line.startswith(("#", ";", "[")) and "=" in line

    for i, line in enumerate(lines):
        if is_setting(line):
            j = i - 1
            while j >= 0 and is_setting(lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), (
                f"{UNIT.name}:{i + 1}: {line!r} has no comment above it")


# ---- Prometheus config and rules ------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def allowed_metric_names() -> set[str]:
    exported = {fam.name: fam.kind for fam in Metrics().families}
    for name, kind in CONTRACT_METRICS.items():  # the list above has not drifted from the code
        assert exported.get(name) == kind, f"{name}: contract says {kind}, code has {exported}"
    for name, kind in ADDED_METRICS.items():
        assert exported.get(name) == kind, f"{name}: README says {kind}, code has {exported}"
    names = set(CONTRACT_METRICS) | set(ADDED_METRICS)
    for name, kind in CONTRACT_METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    # prometheus-client's default process collector, as the proxy registers it.
    registry = Metrics().registry
    names |= {s.name for fam in registry.collect() for s in fam.samples
              if s.name.startswith("process_")}
    return names | PROMETHEUS_SERIES


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small lexer, enough for our rules)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if m.group(2) or m.group(1).lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(m.group(1))
    return names


def test_metric_name_lexer() -> None:
    assert metric_names('sum by (upstream, server) (rate(a_total{job="x"}[5m])) > 0') == {
        "a_total"}
    assert metric_names("b / on (listener) group_left () c:d > 0.9") == {"b", "c:d"}
    assert metric_names('label_replace(vector(1e3), "listener", "web", "", "")') == set()
    assert metric_names("x offset 5m unless y") == {"x", "y"}


def rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    out: list[dict[str, Any]] = []
    names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        assert group["name"] not in names, f"duplicate group {group['name']}"
        names.add(group["name"])
        assert group["rules"], f"group {group['name']} is empty"
        out.extend(group["rules"])
    return out


def test_alert_rules_structure_and_metric_names() -> None:
    all_rules = rules()
    recorded = {r["record"] for r in all_rules if "record" in r}
    allowed = allowed_metric_names() | recorded
    alerts = {}
    for rule in all_rules:
        expr = rule["expr"]
        assert isinstance(expr, str) and expr.strip()
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {unknown}"
        if "record" in rule:
            assert set(rule) <= {"record", "expr", "labels"}, rule.keys()
            assert re.fullmatch(r"[a-z_]+:[a-z_]+(:[a-z_]+)?", rule["record"]), rule["record"]
            continue
        name = rule["alert"]
        assert name not in alerts, f"duplicate alert {name}"
        alerts[name] = rule
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, (name, rule.keys())
        assert DURATION.match(str(rule["for"])), (name, rule["for"])
        assert rule["labels"].get("severity") in SEVERITIES, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        # every selector of a proxy metric names the scrape job, so other jobs never match
        for m in re.finditer(r"\b(proxy_\w+|process_\w+|up)\b(\{[^}]*\})?", expr):
            assert m.group(2) and f'job="{JOB}"' in m.group(2), (name, m.group(0))

    def expr_of(alert: str) -> str:
        assert alert in alerts, f"missing alert {alert}; have {sorted(alerts)}"
        flat = " ".join(alerts[alert]["expr"].split())
        return re.sub(r"\s+\)", ")", re.sub(r"\(\s+", "(", flat))

    assert re.search(r'increase\(proxy_upgrades_total\{[^}]*result="failed"[^}]*\}\[15m\]\) > 0',
                     expr_of("ProxyUpgradeFailed"))
    assert "sum by (upstream, server) (rate(proxy_upstream_connect_failures_total" in expr_of(
        "ProxyUpstreamServerFailing")
    assert expr_of("ProxyDown") == f'up{{job="{JOB}"}} == 0'
    assert "proxy_connections_active" in expr_of("ProxyConnectionsNearLimit")
    assert "proxy:listener_max_connections" in expr_of("ProxyConnectionsNearLimit")


def test_prometheus_config_structure() -> None:
    doc = load_yaml(PROMETHEUS)
    for rule_file in doc["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file
    assert "alerts.yml" in doc["rule_files"]
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    job = jobs[JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets), targets
    assert doc["alerting"]["alertmanagers"]


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package: prometheus)")


@needs_promtool
def test_promtool_check_config_and_rules() -> None:
    res = run_tool("promtool", "check", "config", str(PROMETHEUS))
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_tool("promtool", "check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr


def alert_case(t: str, alert: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": t, "alertname": alert,
            "exp_alerts": [{"exp_labels": labels} for labels in expected]}


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool rule unit tests: each alert fires on a made-up history, and not before."""
    # promtool compares annotations exactly; `check rules` has validated their templates, so
    # the unit tests run on a copy without them and compare labels and timing only.
    doc = load_yaml(ALERTS)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_copy = tmp_path / "alerts.yml"
    rules_copy.write_text(yaml.safe_dump(doc))
    a = {"job": JOB, "instance": "a"}
    b = {"job": JOB, "instance": "b"}

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{body}}}", "values": values}

    server = {"upstream": "app", "server": "10.0.0.1:9000"}
    tests = [
        {"interval": "1m",
         "input_series": [
             series("up", a, "1 1 0 0 0 0"),
             series("up", b, "1x6"),
             series("proxy_upgrades_total", {**a, "result": "failed"}, "0 0 0 1x30"),
             series("proxy_upgrades_total", {**b, "result": "failed"}, "0x33"),
             series("proxy_upstream_connect_failures_total", {**a, **server}, "0+6x30"),
             series("proxy_upstream_connect_failures_total", {**b, **server}, "0+3x30"),
             series("proxy_upstream_connect_failures_total",
                    {**a, "upstream": "app", "server": "10.0.0.2:9000"}, "0x30"),
             series("proxy_connections_active", {**a, "listener": "web"}, "9500x80"),
             series("proxy_connections_active", {**b, "listener": "web"}, "100x80"),
             series("proxy_connections_active", {**a, "listener": "api"}, "5x80"),
             series("proxy_generation", a, "1 2 3 3 1 1"),
             series("proxy_generation", b, "1 2 3 4 5 6"),
             series("proxy_worker_restarts_total", {**a, "reason": "died"}, "0 0 0 1x30"),
             series("proxy_worker_restarts_total", {**b, "reason": "hung"}, "0x33"),
             series("process_open_fds", a, "900x10"),
             series("process_max_fds", a, "1000x10"),
             series("process_open_fds", b, "10x10"),
             series("process_max_fds", b, "1000x10"),
         ],
         "alert_rule_test": [
             alert_case("2m", "ProxyDown"),
             alert_case("4m", "ProxyDown", {**a, "severity": "critical"}),
             alert_case("2m", "ProxyUpgradeFailed"),
             alert_case("4m", "ProxyUpgradeFailed",
                        {**a, "result": "failed", "severity": "warning"}),
             alert_case("14m", "ProxyUpgradeFailed",  # still within the 15 min window
                        {**a, "result": "failed", "severity": "warning"}),
             alert_case("25m", "ProxyUpgradeFailed"),  # out of the window again
             alert_case("5m", "ProxyUpstreamServerFailing"),  # pending, not yet 10 min
             alert_case("15m", "ProxyUpstreamServerFailing", {**server, "severity": "warning"}),
             alert_case("3m", "ProxyConnectionsNearLimit"),
             alert_case("6m", "ProxyConnectionsNearLimit",
                        {**a, "listener": "web", "severity": "warning"}),
             alert_case("30m", "ProxyListenerLimitUnknown"),
             alert_case("61m", "ProxyListenerLimitUnknown",
                        {**a, "listener": "api", "severity": "info"}),
             alert_case("2m", "ProxyWorkerRestarted"),
             alert_case("4m", "ProxyWorkerRestarted",
                        {**a, "reason": "died", "severity": "warning"}),
             alert_case("25m", "ProxyWorkerRestarted"),
             alert_case("3m", "ProxyRestarted"),
             alert_case("4m", "ProxyRestarted", {**a, "severity": "warning"}),
             alert_case("3m", "ProxyFileDescriptorsNearLimit"),
             alert_case("6m", "ProxyFileDescriptorsNearLimit", {**a, "severity": "warning"}),
             alert_case("6m", "ProxyTargetsMissing"),
         ]},
        {"interval": "1m",
         "input_series": [
             series("proxy_build_info", {**a, "version": "1.0"}, "1x200"),
             series("proxy_build_info", {**b, "version": "1.1"}, "1x200"),
             series("proxy_build_info", {"job": JOB, "instance": "c", "version": "1.1"}, "1x200"),
         ],
         "alert_rule_test": [
             alert_case("1h", "ProxyFleetMixedVersions"),
             alert_case("150m", "ProxyFleetMixedVersions", {"severity": "info"}),
             alert_case("3m", "ProxyTargetsMissing"),
             alert_case("150m", "ProxyTargetsMissing", {"job": JOB, "severity": "critical"}),
         ]},
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules_copy)],
                                    "evaluation_interval": "1m", "tests": tests}))
    res = run_tool("promtool", "test", "rules", str(spec))
    assert res.returncode == 0, res.stdout + res.stderr


# ---- sd_notify across a hot upgrade ---------------------------------------------------------------

def ours(pid: int, cfg: Path) -> bool:
    """`pid` is a proxy generation started with our config (never signal anything else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"proxy" in cmdline and os.fsencode(cfg) in cmdline


class NotifySocket:
    """A stand-in for systemd's notify socket: a Unix datagram socket that also reports the
    sender's pid (SCM_CREDENTIALS), as systemd uses it to attribute messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    def close(self) -> None:
        self.sock.close()

    def receive(self, deadline: float, log: Path, until: str = "READY=1"
                ) -> tuple[dict[str, str], int]:
        """The next datagram holding `until`, as ({field: value}, sender pid)."""
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(left, 1.0))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            sender = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[:12])[0]
            text = data.decode()
            seen.append(text)
            if until in text.split("\n"):
                fields = dict(line.partition("=")[::2] for line in text.split("\n") if line)
                return fields, sender
        raise AssertionError(f"no {until} on $NOTIFY_SOCKET in time; got {seen}; log tail:\n"
                             + tail(log))


def tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_for(pred: Callable[[], object], deadline: float, what: str, log: Path) -> None:
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log tail:\n{tail(log)}")
        time.sleep(0.02)


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when its Unix socket paths would not fit sun_path."""
    if len(os.fsencode(tmp_path)) <= 80:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="pxd"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_sd_notify_ready_and_mainpid_follow_a_hot_upgrade(short_dir: Path) -> None:
    cfg = short_dir / "config.toml"
    log = short_dir / "proxy.log"
    pidfile = short_dir / "proxy.pid"
    cfg.write_text(
        "[proxy]\n"
        'pidfile = "proxy.pid"\n'
        'takeover_socket = "proxy.takeover"\n'
        "drain_timeout = 5.0\n"
        "upgrade_timeout = 20.0\n"
        "\n[metrics]\n"
        'listen = "127.0.0.1:0"\n'
        "\n[[listener]]\n"
        'name = "web"\n'
        'listen = "127.0.0.1:0"\n'
        'mode = "tcp"\n'
        'upstream = "app"\n'
        "\n[upstream.app]\n"
        # never connected: nothing dials the listener in this test
        f'servers = ["127.0.0.1:{dead_port()}"]\n')
    notify = NotifySocket(short_dir / "notify")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "PROXY_TEST_FAULT_FILE")}
    env.update(NOTIFY_SOCKET=str(notify.path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    pids: set[int] = set()
    with log.open("ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, cwd=short_dir)
    first = proc.pid
    pids.add(first)
    try:
        # 1. the first generation: MAINPID=<its pid> and READY=1, from itself, pidfile written
        fields, sender = notify.receive(time.monotonic() + 30, log)
        assert fields.get("MAINPID") == str(first), fields
        assert sender == first
        assert pidfile.read_text().strip() == str(first)
        assert re.search(rf"event=phase gen=1 pid={first} .*phase=serving", log.read_text())

        # 2. SIGUSR2: the next generation announces itself (as `systemctl reload` relies on)
        os.kill(first, signal.SIGUSR2)
        fields, sender = notify.receive(time.monotonic() + 40, log)
        second = int(fields["MAINPID"])
        pids.add(second)
        assert second != first
        assert sender == second, "MAINPID= must come from the new generation itself"
        # the pidfile is written before the notification, so it already names the new pid
        assert pidfile.read_text().strip() == str(second)
        # the old generation holds nothing (no connections) and exits 0 on its own
        assert proc.wait(timeout=30) == 0, tail(log)
        assert alive(second), tail(log)
        deadline = time.monotonic() + 15
        wait_for(lambda: re.search(rf"event=phase gen=2 pid={second} .*phase=serving",
                                   log.read_text()), deadline, "gen 2 serving", log)

        # 3. a graceful stop of the new main process (what `systemctl stop` sends)
        os.kill(second, signal.SIGTERM)
        deadline = time.monotonic() + 30
        wait_for(lambda: not alive(second), deadline, f"pid {second} to exit", log)
        assert re.search(rf"event=exit gen=2 pid={second} code=0", log.read_text()), tail(log)
        assert not pidfile.exists(), "a stopped generation leaves no pidfile naming itself"
    finally:
        for pid in pids:
            if alive(pid) and ours(pid, cfg):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        notify.close()
