"""The takeover codec, sans-IO: byte-literal frames in, messages or ProtocolError out."""

from __future__ import annotations

import json
import os
import struct

import pytest

from proxy.forward import DirectionSnapshot, PairSnapshot
from proxy.takeover import (
    HEADER,
    MAX_BODY,
    MAX_FDS,
    Codec,
    ConnRecord,
    Message,
    MsgType,
    ProtocolError,
    conns_message,
    parse_conns,
)


def frame(typ: int, head: bytes = b"{}", body: bytes = b"", nfds: int = 0, magic: bytes = b"PXTK",
          version: int = 1, hlen: int | None = None, blen: int | None = None) -> bytes:
    return HEADER.pack(magic, version, typ, nfds, len(head) if hlen is None else hlen,
                       len(body) if blen is None else blen) + head + body


def test_roundtrip_in_one_byte_pieces() -> None:
    data = Codec.send(Message(MsgType.HELLO, {"pid": 42}))
    assert data == b"PXTK\x00\x01\x00\x01\x00\x00\x00\x00\x00\x0a\x00\x00\x00\x00" + b'{"pid":42}'
    c = Codec()
    for i in range(len(data)):
        assert c.next_message() is None
        c.receive_data(data[i:i + 1])
    msg = c.next_message()
    assert msg is not None and msg.type is MsgType.HELLO and msg.head == {"pid": 42}
    assert c.next_message() is None


def test_two_frames_in_one_read_take_their_fds_in_order() -> None:
    c = Codec()
    c.receive_data(frame(MsgType.LISTENERS, b'{"listeners":["a"]}', nfds=1)
                   + frame(MsgType.LISTENERS, b'{"listeners":["b","c"]}', nfds=2))
    c.receive_fds([10, 11, 12])
    m1, m2 = c.next_message(), c.next_message()
    assert m1 is not None and m1.fds == [10]
    assert m2 is not None and m2.fds == [11, 12]
    assert c.leftover_fds() == []


@pytest.mark.parametrize(("data", "why"), [
    (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    (b"XX", "bad magic"),
    (frame(1, version=2), "unsupported version 2"),
    (frame(99), "unknown message type 99"),
    (frame(1, nfds=MAX_FDS + 1), "out of bounds"),
    (frame(1, hlen=0, head=b""), "out of bounds"),
    (frame(1, blen=MAX_BODY + 1), "out of bounds"),
    (frame(1, head=b"[1,2]"), "not a JSON object"),
    (frame(1, head=b"\xff\xfe"), "not JSON"),
    (frame(1, head=b"{}", nfds=2), "without its fds"),
])
def test_garbage_is_a_protocol_error(data: bytes, why: str) -> None:
    c = Codec()
    c.receive_data(data)
    with pytest.raises(ProtocolError, match=why):
        c.next_message()


def test_truncated_frame_waits_and_never_invents_a_message() -> None:
    data = Codec.send(Message(MsgType.READY))
    c = Codec()
    c.receive_data(data[:-1])
    assert c.next_message() is None


def test_fds_of_a_bad_head_are_left_for_closing() -> None:
    c = Codec()
    c.receive_data(frame(MsgType.CONNS, b"not json", nfds=2))
    c.receive_fds([5, 6])
    with pytest.raises(ProtocolError):
        c.next_message()
    assert sorted(c.leftover_fds()) == [5, 6]


def test_conns_roundtrip_with_pending_bytes_and_half_close() -> None:
    recs = [ConnRecord(1, "web", "tcp", "127.0.0.1:5", "127.0.0.1:9",
                       PairSnapshot(DirectionSnapshot(b"abc", True, True),
                                    DirectionSnapshot(os.urandom(1000), False, False))),
            ConnRecord(2, "web", "tcp", "127.0.0.1:6", "127.0.0.1:9", PairSnapshot())]
    msg = conns_message(recs, [3, 4, 5, 6])
    c = Codec()
    c.receive_data(Codec.send(msg))
    c.receive_fds([3, 4, 5, 6])
    out = c.next_message()
    assert out is not None
    got = parse_conns(out)
    assert got == [(recs[0], [3, 4]), (recs[1], [5, 6])]


@pytest.mark.parametrize("mutate", [
    lambda h: h["conns"][0].pop("id"),
    lambda h: h["conns"][0].update(id="1"),
    lambda h: h["conns"][0].update(id=True),
    lambda h: h["conns"][0]["c2u"].update(pending=[0, 999]),
    lambda h: h["conns"][0]["c2u"].update(pending=[-1, 1]),
    lambda h: h["conns"][0]["u2c"].update(eof="yes"),
    lambda h: h.update(conns="x"),
])
def test_conns_strict_decoding(mutate: object) -> None:
    msg = conns_message([ConnRecord(1, "web", "tcp", "a", "b", PairSnapshot(
        DirectionSnapshot(b"xy")))], [3, 4])
    head = json.loads(json.dumps(msg.head))
    mutate(head)  # type: ignore[operator]
    bad = Message(MsgType.CONNS, head, msg.body, [3, 4])
    with pytest.raises(ProtocolError):
        parse_conns(bad)


def test_conns_fds_per_mode() -> None:
    recs = [ConnRecord(1, "web", "tcp", "a", "b", PairSnapshot()),
            ConnRecord(2, "api", "http", "c", "", PairSnapshot(DirectionSnapshot(b"GET / HT"))),
            ConnRecord(3, "api", "tunnel", "d", "e", PairSnapshot())]
    assert [(r.id, fds) for r, fds in parse_conns(conns_message(recs, [3, 4, 5, 6, 7]))] == [
        (1, [3, 4]), (2, [5]), (3, [6, 7])]
    for fds in ([3, 4, 5, 6], [3, 4, 5, 6, 7, 8]):
        with pytest.raises(ProtocolError, match="wrong number of fds"):
            parse_conns(conns_message(recs, fds))
    bad = conns_message([ConnRecord(1, "web", "udp", "a", "b", PairSnapshot())], [3])
    with pytest.raises(ProtocolError, match="unknown connection mode"):
        parse_conns(bad)


def test_header_layout_is_documented_size() -> None:
    assert HEADER.size == 18 == struct.calcsize("!4sHHHII")
