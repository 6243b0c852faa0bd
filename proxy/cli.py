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
            sp.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
        if name == "upgrade":
            sp.add_argument("--timeout", type=float, default=None,
                            help="seconds to wait (default: upgrade_timeout + 5)")
    mig = sub.add_parser("migrate", help="move every connection and the moving addresses to "
                         "the proxy of another host (see README, Host migration)")
    mig.add_argument("--config", default="config.toml", type=Path)
    mig.add_argument("--to", required=True, help="HOST:PORT, the peer's [migration] listen")
    mig.add_argument("--timeout", type=float, default=None,
                     help="seconds to wait for the outcome (default: drain_timeout + 60)")
    mig.add_argument("--no-replay", action="store_true",
                     help="do not re-send to the peer the packets that arrived during the freeze")
    demo = sub.add_parser("demo", help="self-contained live demo of hot upgrades")
    demo.add_argument("--upgrades", type=int, default=3)
    demo.add_argument("--streams", type=int, default=4)
    demo.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from proxy import demo

        return demo.main(upgrades=args.upgrades, streams=args.streams, workers=args.workers)
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
    if args.command == "migrate":
        return migrate_cmd(cfg, args.to, args.timeout, not args.no_replay)
    from proxy import generation

    log.setup(cfg.proxy.log_level)
    _raise_nofile()
    try:
        return _run(cfg, args)
    except BaseException as exc:
        cause = _startup_error(exc, generation.StartupError)
        if cause is None:
            raise
        log.error("startup_failed", reason=str(cause))
        print(f"proxy: cannot start: {cause}", file=sys.stderr)
        return 1


def _startup_error(exc: BaseException, kind: type[Exception]) -> BaseException | None:
    """The StartupError in `exc`, which arrives in an exception group when it was raised in
    the generation's nursery; None when `exc` is anything else."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, kind) else None


def _run(cfg: config.Config, args: argparse.Namespace) -> int:
    from proxy import generation

    run_argv = ["run", "--config", str(cfg.path), "--takeover"]
    if args.worker is not None:  # started by a supervisor (supervisor.py), never by hand
        from proxy.worker import WorkerSpec

        try:
            spec = WorkerSpec.from_env()
        except (ValueError, KeyError, TypeError) as exc:
            print(f"proxy: --worker: {exc}", file=sys.stderr)
            return EXIT_INVALID
        return trio.run(generation.run, cfg, run_argv, False, spec)
    if cfg.proxy.workers > 1:
        from proxy import supervisor

        return trio.run(supervisor.run, cfg, run_argv, args.takeover)
    return trio.run(generation.run, cfg, run_argv, args.takeover)


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
    """Signal the serving generation and wait for the outcome of the attempt that answers this
    signal: the first one that began after it (an attempt answers every signal that came before
    it began, so a signal queued behind a running attempt is answered by the next one)."""
    old = pidfile.read(cfg.proxy.pidfile)
    if old is None:
        print(f"proxy upgrade: no pid in {cfg.proxy.pidfile}", file=sys.stderr)
        return 1
    sent = time.time()
    try:
        os.kill(old, signal.SIGUSR2)
    except ProcessLookupError:
        print(f"proxy upgrade: pid {old} from {cfg.proxy.pidfile} is not running", file=sys.stderr)
        return 1
    # A queued signal waits for the attempt in progress (at most upgrade_timeout) first.
    deadline = time.monotonic() + (timeout or 2 * cfg.proxy.upgrade_timeout + 5.0)
    while time.monotonic() < deadline:
        for a in pidfile.attempts_since(cfg.proxy.pidfile, sent):
            if a.get("result") == "success":
                print(f"upgraded: pid {a.get('old_pid')} -> {a.get('new_pid')}")
                return 0
            print(f"proxy upgrade: rolled back: {a.get('reason')}; pid {a.get('old_pid')} "
                  "still serves", file=sys.stderr)
            return 1
        serving = pidfile.read(cfg.proxy.pidfile)
        if serving is None or not pidfile.alive(serving):
            print(f"proxy upgrade: pid {serving} exited and nothing replaced it", file=sys.stderr)
            return 1
        time.sleep(0.02)
    print(f"proxy upgrade: no outcome within the timeout; pid {pidfile.read(cfg.proxy.pidfile)}"
          " serves (see its log)", file=sys.stderr)
    return 1


def migrate_cmd(cfg: config.Config, to: str, timeout: float | None, replay: bool = True) -> int:
    """Ask this host's proxy (its control socket) to migrate to `to`; print the outcome."""
    from proxy import migrate

    if cfg.migration is None:
        print("proxy migrate: no [migration] section in the config", file=sys.stderr)
        return 1
    try:
        config.parse_address("--to", to)
    except config.ConfigError as exc:
        print(f"proxy migrate: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        reply = migrate.request(cfg, to, timeout or cfg.proxy.drain_timeout + 60.0, replay)
    except (OSError, ValueError) as exc:
        print(f"proxy migrate: no answer from the local proxy: {exc}", file=sys.stderr)
        return 1
    if reply.get("ok"):
        print(f"migrated: {reply.get('moved')} connections in {reply.get('ms')} ms")
        return 0
    print(f"proxy migrate: failed: {reply.get('reason')} (every connection is still served here)",
          file=sys.stderr)
    return 1
