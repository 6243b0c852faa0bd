"""The command line: argparse -> config -> action; errors become one line and an exit code.

Exit codes: 0 success; 2 invalid config or usage (one line naming the key); 1 any other failure
(with its cause). See the README for each command.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path

import trio

from proxy import __version__, config, log, pidfile

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxy", description="zero-downtime trio reverse proxy")
    p.add_argument("--version", action="version", version=f"proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve in the foreground"),
                       ("check", "validate the config and print a summary"),
                       ("upgrade", "hot-upgrade the serving generation and wait for the outcome")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", default="config.toml", type=Path)
        if name == "run":
            sp.add_argument("--takeover", action="store_true",
                            help="take over from the generation serving on takeover_socket")
        if name == "upgrade":
            sp.add_argument("--timeout", type=float, default=None,
                            help="seconds to wait (default: upgrade_timeout + 5)")
    demo = sub.add_parser("demo", help="self-contained live demo of hot upgrades")
    demo.add_argument("--upgrades", type=int, default=3)
    demo.add_argument("--streams", type=int, default=4)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from proxy import demo

        return demo.main(upgrades=args.upgrades, streams=args.streams)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"proxy: invalid config: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "check":
        print(config.summary(cfg))
        return 0
    if args.command == "upgrade":
        return upgrade(cfg, args.timeout)
    from proxy import generation

    log.setup(cfg.proxy.log_level)
    _raise_nofile()
    run_argv = ["run", "--config", str(cfg.path), "--takeover"]
    try:
        return trio.run(generation.run, cfg, run_argv, args.takeover)
    except generation.StartupError as exc:
        log.error("startup_failed", reason=str(exc))
        print(f"proxy: cannot start: {exc}", file=sys.stderr)
        return 1


def _raise_nofile() -> None:
    """Two fds per tcp pair: raise our soft RLIMIT_NOFILE to the hard limit (as HAProxy does),
    so a manual start with a soft limit of 1024 does not run out at ~500 pairs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("nofile_unchanged", soft=soft, hard=hard, error=str(exc))
            return
    log.debug("nofile", limit=max(soft, hard))


def upgrade(cfg: config.Config, timeout: float | None) -> int:
    """Signal the serving generation and wait until a new pid serves (0) or the attempt is
    reported failed in the status file beside the pidfile (1, with the reason)."""
    old = pidfile.read(cfg.proxy.pidfile)
    if old is None:
        print(f"proxy upgrade: no pid in {cfg.proxy.pidfile}", file=sys.stderr)
        return 1
    started = time.time()
    try:
        os.kill(old, signal.SIGUSR2)
    except ProcessLookupError:
        print(f"proxy upgrade: pid {old} from {cfg.proxy.pidfile} is not running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + (timeout or cfg.proxy.upgrade_timeout + 5.0)
    while time.monotonic() < deadline:
        pid = pidfile.read(cfg.proxy.pidfile)
        if pid is not None and pid != old and pidfile.alive(pid):
            print(f"upgraded: pid {old} -> {pid}")
            return 0
        status = pidfile.read_status(cfg.proxy.pidfile)
        if (status and status.get("result") == "failed" and status.get("pid") == old
                and float(status.get("at", 0)) >= started):
            print(f"proxy upgrade: rolled back: {status.get('reason')}; pid {old} still serves",
                  file=sys.stderr)
            return 1
        if not pidfile.alive(old) and pid == old:
            print(f"proxy upgrade: pid {old} exited and nothing replaced it", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"proxy upgrade: no outcome within the timeout; pid {pidfile.read(cfg.proxy.pidfile)}"
          " serves (see its log)", file=sys.stderr)
    return 1

