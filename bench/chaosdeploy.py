"""The chaos soak's deployment: both backends, the proxy in front of them, the load through it
and the sampler watching it; set up, torn down (each process by pid), and asked which pid serves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.chaosload import Load
from bench.chaoswatch import LogWatch, Sampler
from bench.chaosweb import WebBackend
from bench.common import LOOPBACK, Helper, ProxyProcess, alive, free_port, stop_popen


class ChaosProxy(ProxyProcess):
    """ProxyProcess on fixed ports, restartable after a stop (same config dir, same log)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retired: list[subprocess.Popen[bytes]] = []

    def restart(self) -> None:
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        if self.proc is not None:
            self.retired.append(self.proc)
        self.start()

    def stop_all(self, pids: set[int], keep_log: str | None = None) -> None:
        # A stopped process would not act on SIGTERM: continue them all first.
        for pid in pids | self.pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.pids |= pids
        if keep_log:
            with contextlib.suppress(OSError):
                shutil.copy(self.log, keep_log)
        self.stop()
        for p in self.retired:
            stop_popen(p, 1.0)


class Deployment:
    """The processes under test and the observers of them. `t_start` is when the load was
    flowing, `t_end` when it stopped."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.echo = Helper("echo")
        self.web = WebBackend()
        self.proxy: ChaosProxy | None = None
        self.watch: LogWatch | None = None
        self.sampler: Sampler | None = None
        self.load: Load | None = None
        self.t_start = 0.0
        self.t_end = 0.0
        self.good_config = ""

    # ---- set-up and tear-down ------------------------------------------------------------------

    def start(self) -> None:
        self.echo.start()
        self.web.start()
        self.proxy = ChaosProxy(
            [{"name": "tcp", "listen": f"{LOOPBACK}:{free_port()}", "mode": "tcp",
              "upstream": "echo", "idle_timeout": 0.0},
             {"name": "web", "listen": f"{LOOPBACK}:{free_port()}", "mode": "http",
              "upstream": "web", "access_log": False}],
            {"echo": {"servers": [f"{LOOPBACK}:{self.echo.port}"]},
             "web": {"servers": [f"{LOOPBACK}:{self.web.port}"]}},
            proxy_opts={"drain_timeout": self.args.drain_timeout,
                        "upgrade_timeout": self.args.upgrade_timeout},
            workers=self.args.workers)
        self.good_config = self.proxy.config.read_text()
        self.proxy.start()
        self.watch = LogWatch(self.proxy.log)
        self.sampler = Sampler(self.watch, self.proxy.pidfile, self.args.sample_ms / 1000)
        self.sampler.start()
        self.load = Load(self.proxy.ports["tcp"], self.proxy.ports["web"], self.args,
                         self.workdir)
        self.wait_progress(10.0)
        self.t_start = time.time()

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        self.t_end = time.time()
        if self.sampler is not None:
            self.sampler.halt.set()
            self.sampler.join(timeout=5.0)
        if self.proxy is not None:
            self.restore_disk()
            pids = self.watch.pids if self.watch else set()
            workers = set(self.watch.workers) if self.watch else set()
            self.proxy.stop_all(pids | workers, self.args.keep_log)
            for pid in pids | workers:  # orphaned to us (subreaper) and gone: no zombies
                alive(pid)
        self.web.stop()
        self.echo.stop()

    # ---- queries -------------------------------------------------------------------------------

    @property
    def px(self) -> ChaosProxy:
        assert self.proxy is not None
        return self.proxy

    @property
    def w(self) -> LogWatch:
        assert self.watch is not None
        return self.watch

    def pidfile_pid(self) -> int:
        try:
            return int(self.px.pidfile.read_text().strip())
        except (OSError, ValueError):
            return 0

    def serving_pid(self) -> int:
        pid = self.pidfile_pid()
        return pid if pid and alive(pid) else 0

    def live_pids(self) -> list[int]:
        """The proxy processes of this deployment still alive."""
        assert self.sampler is not None
        return self.sampler.live_pids()

    def restore_disk(self) -> None:
        self.px.config.write_text(self.good_config)
        shutil.rmtree(self.px.dir / "proxy", ignore_errors=True)

    def wait_progress(self, timeout: float) -> list[str]:
        """Wait until every client did at least one more op; returns the ones that did not."""
        assert self.load is not None
        base = self.load.progress()
        deadline = time.monotonic() + timeout
        while True:
            now = self.load.progress()
            stuck = sorted(k for k in set(base) | set(now) if now.get(k, 0) <= base.get(k, 0))
            if not stuck or time.monotonic() > deadline:
                return stuck
            time.sleep(0.05)

    def wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.live_pids():
            time.sleep(0.05)
