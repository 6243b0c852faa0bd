"""Network namespaces for the host-migration tests: client, host A, host B and an upstream on
one bridge (in a hub namespace of its own, so the host's own network is never touched).

    client 10.77.0.1   A 10.77.0.11   B 10.77.0.12   upstream 10.77.0.13
    moving: 10.77.0.100 (the listeners' service address), 10.77.0.101 (the upstream source)

Names carry the test process's pid; `Topology.close()` deletes every namespace it made (and
their veths with them). The tests spawn `ip` (the proxy itself uses netlink only). Processes
in a namespace run through `ip netns exec`, are stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tests.support.proc import ROOT, Proxy, render_config

SUBNET = "10.77.0"
SERVICE = f"{SUBNET}.100"
SOURCE = f"{SUBNET}.101"
HOSTS = {"cl": f"{SUBNET}.1", "a": f"{SUBNET}.11", "b": f"{SUBNET}.12", "up": f"{SUBNET}.13"}
MOVING = [f"{SERVICE}/32 dev eth0", f"{SOURCE}/32 dev eth0"]
MIG_PORT = 7070
TCP_PORT, HTTP_PORT = 8080, 8081


def unavailable() -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TCP_REPAIR)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns)"
    return ""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


class Topology:
    def __init__(self, tag: str = "") -> None:
        self.tag = f"{os.getpid()}{tag}"
        self.ns = {k: f"mg{self.tag}{k}" for k in (*HOSTS, "hub")}
        self.made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        hub = self.ns["hub"]
        ip("netns", "add", hub)
        self.made.append(hub)
        self.run("hub", "ip", "link", "add", "br0", "type", "bridge")
        self.run("hub", "ip", "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(HOSTS.items()):
            ns = self.ns[name]
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
               "netns", hub)
            self.run("hub", "ip", "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        for addr in (SERVICE, SOURCE):
            ip("-n", self.ns["a"], "addr", "add", f"{addr}/32", "dev", "eth0")

    def run(self, name: str, *cmd: str) -> str:
        res = subprocess.run(["ip", "netns", "exec", self.ns[name], *cmd], capture_output=True,
                             text=True, timeout=20)
        if res.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)}: {res.stderr.strip()}")
        return res.stdout

    def has_address(self, name: str, addr: str) -> bool:
        return f" {addr}/" in ip("-n", self.ns[name], "-o", "addr", "show", "dev", "eth0").stdout

    def tcp_counters(self, name: str) -> dict[str, int]:
        """The Tcp: line of /proc/net/snmp in a namespace (EstabResets, OutRsts, ...)."""
        lines = [ln.split() for ln in self.run(name, "cat", "/proc/net/snmp").splitlines()
                 if ln.startswith("Tcp:")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}

    def spawn(self, name: str, *args: str) -> subprocess.Popen[str]:
        """A Python helper (tests.support.mignet_peer) in a namespace, lines on stdin/stdout."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], sys.executable, "-m",
             "tests.support.mignet_peer", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def close(self) -> None:
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made.clear()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line of a helper within `timeout` (its stderr tail on failure)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    if not ready:
        raise AssertionError(f"helper said nothing in {timeout}s: {_stderr(proc)}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"helper exited: {_stderr(proc)}")
    return line.strip()


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        return "(still running)"
    assert proc.stderr is not None
    return proc.stderr.read()[-2000:]


def stop_helper(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        # `ip netns exec` execs the helper: this pid is the helper itself.
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def write_key(directory: Path, key: bytes = b"k" * 32, mode: int = 0o600) -> Path:
    path = directory / "migration.key"
    path.write_bytes(key)
    path.chmod(mode)
    return path


class NsProxy(Proxy):
    """The real proxy in one of the topology's namespaces, configured for migration: a tcp
    listener (echo upstream) and an http listener, both on the moving service address."""

    def __init__(self, topo: Topology, host: str, key: bytes = b"k" * 32,
                 migration: bool = True, extra: str = "", prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: a command the proxy runs under (e.g. setpriv dropping capabilities)."""
        super().__init__([f"{HOSTS['up']}:9000"])
        self.topo, self.host, self.prefix = topo, host, prefix
        self.key_path = write_key(self.dir, key)
        up = HOSTS["up"]
        text = render_config(
            self.proxy_section,
            [{"name": "web", "listen": f"{SERVICE}:{TCP_PORT}", "mode": "tcp", "upstream": "app"},
             {"name": "api", "listen": f"{SERVICE}:{HTTP_PORT}", "mode": "http",
              "upstream": "web"}],
            {"app": {"servers": [f"{up}:9000"], "source": SOURCE},
             "web": {"servers": [f"{up}:9001"], "source": SOURCE}})
        if migration:
            text += ("\n[migration]\n"
                     f'listen = "{HOSTS[host]}:{MIG_PORT}"\n'
                     'key_file = "migration.key"\n'
                     f"addresses = {MOVING!r}\n".replace("'", '"'))
        self.write_config(text + extra)

    def start(self, timeout: float = 15.0) -> NsProxy:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.topo.ns[self.host], *self.prefix, sys.executable, "-m",
             "proxy", "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf, env=self.env,
            cwd=self.dir)
        self.wait_log(r"event=phase gen=1 .*phase=serving", timeout=timeout)
        self.port = TCP_PORT
        return self

    def migrate(self, to: str, timeout: float = 60.0,
                replay: bool = True) -> subprocess.CompletedProcess[str]:
        """`python -m proxy migrate` run in this proxy's namespace (as an operator would)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.topo.ns[self.host], sys.executable, "-m", "proxy",
             "migrate", "--config", str(self.config), "--to", to,
             *([] if replay else ["--no-replay"])],
            capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.dir)

    def wait_exit(self, timeout: float = 15.0) -> None:
        """Every process this deployment started has exited (by pid)."""
        from tests.support.proc import alive

        deadline = time.monotonic() + timeout
        pids = self.all_pids()
        while time.monotonic() < deadline:
            if not any(alive(p) for p in pids):
                if self.proc is not None:
                    self.proc.wait(timeout=5)
                return
            time.sleep(0.02)
        raise AssertionError(f"proxy on {self.host} still running; log tail:\n{self.tail()}")


def mark(proc: subprocess.Popen[str]) -> None:
    """Tell a clients helper to measure its echo streams' worst round trip from now on."""
    assert proc.stdin is not None
    proc.stdin.write("mark\n")
    proc.stdin.flush()
    assert read_line(proc, 10) == "marked"


def result(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """Tell a clients helper to stop and read its JSON summary."""
    import json

    stdin: IO[str] | None = proc.stdin
    assert stdin is not None
    stdin.write("stop\n")
    stdin.flush()
    out: dict[str, Any] = json.loads(read_line(proc, timeout))
    return out
