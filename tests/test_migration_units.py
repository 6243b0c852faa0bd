"""Host migration's pure parts: the [migration] config, the socket dump codec, the authenticated
wire (handshake, forged / replayed / reordered frames), the moving-address parser and the ARP
frame. The whole migration runs in tests/e2e/test_migrate.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from proxy import config
from proxy.migwire import (
    KIND_REPORT,
    KIND_SESSION,
    Wire,
    WireError,
    parse_payload,
    report_payload,
    session_payload,
)
from proxy.netaddr import garp_frame, parse_moving
from proxy.repair import RepairError, SocketDump

BASE = """
[[listener]]
name = "web"
listen = "10.0.0.100:8080"
upstream = "app"
[upstream.app]
servers = ["10.0.0.5:9000"]
source = "10.0.0.101"
"""
MIGRATION = """
[migration]
listen = "10.0.0.11:7070"
key_file = "mig.key"
addresses = ["10.0.0.100/32 dev eth0", "10.0.0.101/32 dev eth0"]
"""


def load(tmp_path: Path, text: str, key: bytes = b"k" * 32, mode: int = 0o600) -> config.Config:
    k = tmp_path / "mig.key"
    k.write_bytes(key)
    k.chmod(mode)
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def test_migration_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE + MIGRATION)
    assert cfg.migration is not None
    assert cfg.migration.key == b"k" * 32 and "k" * 32 not in repr(cfg.migration)
    assert cfg.moves("10.0.0.100") and not cfg.moves("10.0.0.11")
    assert cfg.upstreams["app"].source == "10.0.0.101" and cfg.upstreams["app"].source_moves
    assert load(tmp_path, BASE).migration is None


@pytest.mark.parametrize(("key", "mode", "words"), [
    (b"short", 0o600, "at least 32"),
    (b"k" * 32, 0o644, "must be 0600"),
])
def test_migration_key_checked(tmp_path: Path, key: bytes, mode: int, words: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, BASE + MIGRATION, key, mode)
    assert str(err.value).startswith("migration.key_file:") and words in str(err.value)


@pytest.mark.parametrize(("text", "key"), [
    (MIGRATION.replace('"10.0.0.100/32 dev eth0"', '"10.0.0.100/32 eth0"'), "migration.addresses[0]"),
    (MIGRATION + "extra = 1\n", "migration.extra"),
    (MIGRATION.replace('listen = "10.0.0.11:7070"\n', ""), "migration.listen"),
])
def test_migration_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, BASE + text)
    assert str(err.value).startswith(key + ":")


def test_upstream_source_must_be_an_address(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"^upstream.app.source:"):
        load(tmp_path, BASE.replace('"10.0.0.101"', '"nowhere"'))


DUMP = SocketDump(socket.AF_INET, ("10.0.0.100", 8080), ("10.0.0.1", 40000), 1000, 2000,
                  b"sent-unsent", 6, b"received", 7, 7, 9, 1448, 123456, bytes(range(20)),
                  87380, 131072)


def test_dump_roundtrip_and_strictness() -> None:
    raw = DUMP.encode()
    assert SocketDump.decode(raw) == (DUMP, len(raw))
    assert DUMP.sent == b"sent-" and DUMP.never_sent == b"unsent"
    v6 = SocketDump(socket.AF_INET6, ("::1", 1), ("fe80::1", 2), *[
        getattr(DUMP, f) for f in ("snd_seq", "rcv_seq", "send_queue", "unsent", "recv_queue",
                                   "options", "snd_wscale", "rcv_wscale", "mss", "timestamp",
                                   "window", "sndbuf", "rcvbuf")])
    assert SocketDump.decode(v6.encode())[0] == v6
    for bad in (raw[:-1], raw[:10], b"\x05" + raw[1:]):
        with pytest.raises(RepairError):
            SocketDump.decode(bad)


def pair(key_a: bytes = b"k" * 32, key_b: bytes = b"k" * 32) -> tuple[Wire, Wire]:
    a, b = Wire("A", key_a), Wire("B", key_b)
    b.receive_data(a.output())
    a.receive_data(b.output())
    b.receive_data(a.output())
    return a, b


def test_wire_handshake_and_frames() -> None:
    a, b = pair()
    assert a.authenticated and b.authenticated
    payload = session_payload(b"frame", [DUMP, DUMP])
    b.receive_data(a.seal(payload))
    got = b.next_payload()
    assert got == payload
    p = parse_payload(got)
    assert p.kind == KIND_SESSION and p.session == b"frame" and p.dumps == (DUMP, DUMP)
    a.receive_data(b.seal(report_payload({"resumed": 3})))
    rep = parse_payload(a.next_payload() or b"")
    assert rep.kind == KIND_REPORT and rep.report == {"resumed": 3}


def test_wire_wrong_key_is_refused_by_either_side() -> None:
    a, b = Wire("A", b"k" * 32), Wire("B", b"x" * 32)
    b.receive_data(a.output())
    with pytest.raises(WireError, match="does not hold"):
        a.receive_data(b.output())
    # B checks A's proof too (an A that answers without the key)
    a2, b2 = Wire("A", b"k" * 32), Wire("B", b"k" * 32)
    b2.receive_data(a2.output())
    b2.output()
    with pytest.raises(WireError, match="does not hold"):
        b2.receive_data(b"\0" * 32)


def test_wire_rejects_forged_replayed_reordered_and_garbage() -> None:
    a, b = pair()
    f1, f2 = a.seal(b"\x01one"), a.seal(b"\x01two")
    forged = bytearray(f1)
    forged[6] ^= 1
    with pytest.raises(WireError):
        b.receive_data(bytes(forged))
        b.next_payload()
    a, b = pair()
    f1, f2 = a.seal(b"\x01one"), a.seal(b"\x01two")
    b.receive_data(f2)  # reordered: sealed as seq 1, read as seq 0
    with pytest.raises(WireError):
        b.next_payload()
    a, b = pair()
    f1 = a.seal(b"\x01one")
    b.receive_data(f1 + f1)  # replayed
    assert b.next_payload() == b"\x01one"
    with pytest.raises(WireError):
        b.next_payload()
    a, b = pair()
    a.receive_data(a.seal(b"\x01x"))  # reflected: sealed as A's, read as B's
    with pytest.raises(WireError):
        a.next_payload()
    with pytest.raises(WireError, match="bad magic"):
        Wire("B", b"k" * 32).receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(WireError, match="out of bounds"):
        _, b2 = pair()
        b2.receive_data(b"\xff\xff\xff\xff")
        b2.next_payload()


def test_parse_payload_is_strict() -> None:
    for bad in (b"", b"\x09", b"\x01\x00\x00\x00\x05ab", session_payload(b"f") + b"x",
                b"\x02[1]"):
        with pytest.raises(WireError):
            parse_payload(bad)


def test_moving_address_and_garp() -> None:
    m = parse_moving("10.0.0.100/32 dev eth0")
    assert (m.ip, m.prefixlen, m.dev, m.key) == ("10.0.0.100", 32, "eth0", "10.0.0.100/32")
    with pytest.raises(ValueError):
        parse_moving("10.0.0.100/32")
    frame = garp_frame(b"\x02" * 6, "10.0.0.100")
    assert len(frame) == 42 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x08\x06"
    assert frame[28:32] == frame[38:42] == socket.inet_aton("10.0.0.100")


def test_fix_checksums_matches_the_kernel() -> None:
    """A real TCP/IPv4 packet (checksums correct) survives zeroing and recomputation."""
    from proxy.netaddr import fix_checksums

    ip = bytes.fromhex("4500003c1c4640004006b1e6ac100a63ac100a0c")  # (header checksum b1e6)
    tcp = bytes.fromhex("e5a90050a0a1a2a300000000a002faf0") + b"\0\0" + bytes(2) + bytes(20)
    eth = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00"
    once = fix_checksums(eth + ip + tcp)
    assert once[24:26] == bytes.fromhex("b1e6")
    broken = bytearray(once)
    broken[24:26] = b"\0\0"
    broken[50:52] = b"\x12\x34"
    assert fix_checksums(bytes(broken)) == once
