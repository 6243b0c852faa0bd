"""Config: the example parses; every invalid config names its dotted key; CLI exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
[proxy]
drain_timeout = 5
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:9000", "[::1]:9001", "localhost:9002"]
"""


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def test_example_config_is_valid() -> None:
    cfg = config.load(ROOT / "config.toml")
    assert cfg.listeners[0].name == "web"
    assert cfg.metrics is not None and cfg.metrics.listen.port == 9100
    assert cfg.proxy.pidfile == ROOT / "proxy.pid"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, GOOD)
    assert cfg.proxy.drain_timeout == 5.0
    assert cfg.proxy.takeover_socket == tmp_path / "proxy.takeover"
    lst = cfg.listeners[0]
    assert (lst.mode, lst.max_connections, lst.sockopts.nodelay) == ("tcp", 10000, True)
    assert lst.sockopts.keepalive == config.Keepalive(60.0, 10.0, 6)
    assert (lst.lingering_close, lst.lingering_time, lst.lingering_timeout) == ("on", 30.0, 5.0)
    up = cfg.upstreams["app"]
    assert [str(s) for s in up.servers] == ["127.0.0.1:9000", "[::1]:9001", "localhost:9002"]
    assert up.balance == "round_robin" and up.connect_timeout == 3.0
    assert cfg.metrics is None


BAD = [
    ("[proxy]\nbogus = 1\n", "proxy.bogus: unknown key"),
    ("[proxy]\ndrain_timeout = -1\n", "proxy.drain_timeout:"),
    ("[proxy]\ndrain_timeout = \"5\"\n", "proxy.drain_timeout: expected a duration"),
    ("[proxy]\nupgrade_timeout = 0\n", "proxy.upgrade_timeout: must be greater than 0"),
    ("[proxy]\nworkers = 0\n", "proxy.workers: expected an integer from 1 to 256"),
    ("[proxy]\nworkers = \"many\"\n", "proxy.workers: expected an integer"),
    ("[proxy]\nworkers = true\n", "proxy.workers: expected an integer"),
    ("[proxy]\nworker_timeout = 0\n", "proxy.worker_timeout: must be greater than 0"),
    ("[metrics]\nlisten = \"nope\"\n", "metrics.listen: expected host:port"),
    ("[metrics]\nlisten = \"127.0.0.1:1\"\nextra = 1\n", "metrics.extra: unknown key"),
    ("[upstream.app]\nservers = [\"127.0.0.1:1\", \"x\"]\n", "upstream.app.servers[1]:"),
    ("[upstream.app]\nservers = []\n", "upstream.app.servers: expected a non-empty array"),
    ("[upstream.app]\nservers = [\"127.0.0.1:1\"]\nbalance = \"random\"\n",
     "upstream.app.balance: expected one of round_robin, least_conn"),
    ("[upstream.app]\nservers = [\"127.0.0.1:1\"]\nconnect_timeout = 0\n",
     "upstream.app.connect_timeout:"),
    ("[upstream.app]\nservers = [\"127.0.0.1:1\"]\nkeepalive = { idle = 1, nope = 2 }\n",
     "upstream.app.keepalive.nope: unknown key"),
    ("[upstream.app]\nservers = [\"127.0.0.1:70000\"]\n", "upstream.app.servers[0]:"),
]
LISTENER = '[[listener]]\nname = "web"\nlisten = "127.0.0.1:8080"\nupstream = "app"\n'
UPSTREAM = '[upstream.app]\nservers = ["127.0.0.1:9000"]\n'


@pytest.mark.parametrize(("text", "expect"), BAD)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, expect: str) -> None:
    parts = [text]
    if "[[listener]]" not in text:
        parts.append(LISTENER)
    if "[upstream.app]" not in text:
        parts.append(UPSTREAM)
    with pytest.raises(config.ConfigError) as err:
        load_text(tmp_path, "\n".join(parts))
    assert str(err.value).startswith(expect), str(err.value)


@pytest.mark.parametrize(("listener", "expect"), [
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "nope"\n', "listener[0].upstream: no [upstream.nope]"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nmode = "udp"\n', "listener[0].mode:"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nmax_connections = 0\n',
     "listener[0].max_connections:"),
    ('listen = "127.0.0.1:1"\nupstream = "app"\n', "listener[0].name: missing"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nnodelay = 1\n',
     "listener[0].nodelay: expected true or false"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nlingering_close = true\n',
     "listener[0].lingering_close: expected a non-empty string"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nlingering_close = "yes"\n',
     "listener[0].lingering_close: expected one of off, on, always"),
    ('name = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\nlingering_timeout = 0\n',
     "listener[0].lingering_timeout: must be greater than 0"),
])
def test_invalid_listener_names_the_key(tmp_path: Path, listener: str, expect: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load_text(tmp_path, "[[listener]]\n" + listener + UPSTREAM)
    assert str(err.value).startswith(expect), str(err.value)


def test_duplicate_listener_names(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"^listener\[1\]\.name: duplicate"):
        load_text(tmp_path, LISTENER + LISTENER.replace("8080", "8081") + UPSTREAM)


def test_no_listener(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"^listener: expected at least one"):
        load_text(tmp_path, UPSTREAM)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


def test_check_cli_valid_and_invalid(tmp_path: Path) -> None:
    ok = run_cli("check", "--config", str(ROOT / "config.toml"))
    assert ok.returncode == 0 and "listener web 127.0.0.1:8080 mode=tcp -> app" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(LISTENER + UPSTREAM + "[surprise]\n")
    for cmd in ("check", "run"):
        res = run_cli(cmd, "--config", str(bad))
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == ["proxy: invalid config: surprise: unknown key"]


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    res = run_cli("check", "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "cannot read config" in res.stderr


def test_workers_auto_is_the_cpu_count(tmp_path: Path) -> None:
    import os

    assert load_text(tmp_path, GOOD).proxy.workers == 1
    auto = load_text(tmp_path, GOOD.replace("[proxy]\n", '[proxy]\nworkers = "auto"\n'))
    assert auto.proxy.workers == max(1, min(256, os.cpu_count() or 1))
    assert load_text(tmp_path, GOOD.replace("[proxy]\n", "[proxy]\nworkers = 3\n")
                     ).proxy.workers == 3


def test_migration_needs_a_single_process(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    text = GOOD.replace("[proxy]\n", "[proxy]\nworkers = 2\n") + (
        '[migration]\nlisten = "127.0.0.1:7070"\nkey_file = "k"\n'
        'addresses = ["10.77.0.100/32 dev eth0"]\n')
    with pytest.raises(config.ConfigError, match=r"^proxy\.workers: host migration"):
        load_text(tmp_path, text)
    load_text(tmp_path, text.replace("workers = 2", "workers = 1"))
