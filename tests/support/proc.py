"""The real proxy as a process: temp config, stderr log file, waits on log lines and pidfiles.

Every wait is bounded (a deadline, then AssertionError with the log's tail); processes are
stopped by pid. Unix socket paths live in a short /tmp dir (sun_path is 108 bytes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from proxy.pidfile import alive as alive  # re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def render_config(proxy: dict[str, Any], listeners: list[dict[str, Any]],
                  upstreams: dict[str, dict[str, Any]], metrics: bool = True) -> str:
    out = ["[proxy]"] + [f"{k} = {toml_value(v)}" for k, v in proxy.items()]
    if metrics:
        out += ["", "[metrics]", 'listen = "127.0.0.1:0"']
    for lst in listeners:
        out += ["", "[[listener]]"] + [f"{k} = {toml_value(v)}" for k, v in lst.items()]
    for name, up in upstreams.items():
        out += ["", f"[upstream.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in up.items()]
    return "\n".join(out) + "\n"


class Proxy:
    """One proxy deployment: a config dir, the first process, and every generation after it."""

    def __init__(self, servers: list[str], *, mode: str = "tcp", listener: dict[str, Any] | None = None,
                 upstream: dict[str, Any] | None = None, proxy: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="px"))
        self.config = self.dir / "config.toml"
        self.log = self.dir / "proxy.log"
        self.pidfile = self.dir / "proxy.pid"
        self.fault_file = self.dir / "fault"
        self.proxy_section = {"pidfile": "proxy.pid", "takeover_socket": "tk",
                              "drain_timeout": 10.0, "upgrade_timeout": 10.0,
                              **(proxy or {})}
        self.listener = {"name": "web", "listen": "127.0.0.1:0", "mode": mode, "upstream": "app",
                         **(listener or {})}
        self.upstream = {"servers": servers, "connect_timeout": 2.0, **(upstream or {})}
        self.write_config()
        self.env = {**os.environ, "PROXY_TEST_FAULT_FILE": str(self.fault_file),
                    "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: Any = None
        self.port = 0
        self.metrics_port = 0

    def write_config(self, text: str | None = None) -> None:
        self.config.write_text(text if text is not None else render_config(
            self.proxy_section, [self.listener], {"app": self.upstream}))

    def start(self, timeout: float = 15.0) -> Proxy:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf, env=self.env,
            cwd=self.dir)
        line = self.wait_log(r"event=phase gen=1 .*phase=serving", timeout=timeout)
        assert line
        self.port = int(self.wait_log(r"event=listening .*listener=web addr=\S+:(\d+)").group(1))
        m = self.find_log(r"event=metrics_listening .*addr=\S+:(\d+)")
        self.metrics_port = int(m.group(1)) if m else 0
        return self

    # ---- logs --------------------------------------------------------------------------------

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def find_log(self, pattern: str, start: int = 0) -> re.Match[str] | None:
        return re.compile(pattern).search(self.text(), start)

    def wait_log(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None and self.serving_pid() is None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line /{pattern}/ within {timeout}s; log tail:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    # ---- generations -------------------------------------------------------------------------

    def serving_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def pid(self) -> int:
        pid = self.serving_pid()
        assert pid is not None, f"no serving pid; log tail:\n{self.tail()}"
        return pid

    def upgrade(self, timeout: float = 20.0) -> int:
        """SIGUSR2 and wait until a new generation serves and the old one has exited."""
        old = self.pid()
        mark = len(self.text())
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.serving_pid()
            if new is not None and new != old and not alive(old):
                self.wait_log(rf"event=takeover_done gen=\d+ pid={new}", start=mark,
                              timeout=max(0.1, deadline - time.monotonic()))
                return new
            time.sleep(0.01)
        raise AssertionError(f"upgrade of {old} did not complete; log tail:\n{self.tail()}")

    def signal_upgrade_expect_failure(self, timeout: float = 30.0) -> re.Match[str]:
        old = self.pid()
        mark = len(self.text())
        os.kill(old, signal.SIGUSR2)
        m = self.wait_log(rf"event=upgrade_failed gen=\d+ pid={old} .*", timeout=timeout,
                          start=mark)
        assert self.serving_pid() == old
        return m

    def arm_fault(self, spec: str) -> None:
        self.fault_file.write_text(spec)

    def disarm_fault(self) -> None:
        self.fault_file.unlink(missing_ok=True)

    def all_pids(self) -> set[int]:
        return {int(p) for p in re.findall(r" pid=(\d+)", self.text())}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop every generation this deployment started, by pid."""
        pids = self.all_pids()
        for pid in pids:
            if alive(pid):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._logf is not None:
            self._logf.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running(servers: list[str], **kwargs: Any) -> Iterator[Proxy]:
    p = Proxy(servers, **kwargs)
    try:
        p.start()
        yield p
    finally:
        p.stop()
