"""The takeover protocol, sans-IO: byte-literal frames, the Session table for both roles, every
out-of-order event, version negotiation, the ACK window, and fd ownership on failure paths."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from proxy.frames import HEADER, MAX_BODY, MAX_FDS, Framer, OwnedFds, encode
from proxy.movable import DirectionSnapshot, PairSnapshot
from proxy.takeover import (
    PROTOCOLS,
    SENDER,
    TRANSITIONS,
    Abort,
    Ack,
    ConnRecord,
    Conns,
    Done,
    Event,
    Hello,
    Listeners,
    LocalProtocolError,
    MsgType,
    ProtocolError,
    Ready,
    Released,
    Role,
    Session,
    State,
    Welcome,
    _encode,
    negotiate,
)


def frame(typ: int, head: bytes = b"{}", body: bytes = b"", nfds: int = 0, magic: bytes = b"PXTK",
          version: int = 1, hlen: int | None = None, blen: int | None = None) -> bytes:
    return HEADER.pack(magic, version, typ, nfds, len(head) if hlen is None else hlen,
                       len(body) if blen is None else blen) + head + body


def conns_roundtrip(records: list[ConnRecord], fds: list[int]) -> list[tuple[ConnRecord, list[int]]]:
    """CONNS through a pair of sessions (old sends, new receives); the receiver claims the fds
    per record (the caller owns them afterwards)."""
    old, new = at_released()
    new.receive_data(old.send(Conns(tuple(records)), fds))
    new.receive_fds(list(fds))
    got = new.next_event()
    assert got is not None
    event, owned = got
    assert isinstance(event, Conns)
    out = [(r, owned.claim(r.nfds)) for r in event.records]
    assert len(owned) == 0
    return out


# ---- frames ----------------------------------------------------------------------------------

def test_frame_layout_in_one_byte_pieces() -> None:
    data = encode(MsgType.HELLO, {"pid": 42})
    assert data == b"PXTK\x00\x01\x00\x01\x00\x00\x00\x00\x00\x0a\x00\x00\x00\x00" + b'{"pid":42}'
    f = Framer()
    for i in range(len(data)):
        assert f.next_frame() is None
        f.receive_data(data[i:i + 1])
    got = f.next_frame()
    assert got is not None and got.type == MsgType.HELLO and got.head == {"pid": 42}
    assert f.next_frame() is None
    assert HEADER.size == 18 == struct.calcsize("!4sHHHII")


def test_two_frames_in_one_read_take_their_fds_in_order() -> None:
    f = Framer()
    f.receive_data(frame(MsgType.LISTENERS, b'{"listeners":["a"]}', nfds=1)
                   + frame(MsgType.LISTENERS, b'{"listeners":["b","c"]}', nfds=2))
    f.receive_fds([10, 11, 12])
    m1, m2 = f.next_frame(), f.next_frame()
    assert m1 is not None and m1.fds.claim() == [10]
    assert m2 is not None and m2.fds.claim() == [11, 12]


@pytest.mark.parametrize(("data", "why"), [
    (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    (b"XX", "bad magic"),
    (frame(1, version=2), "unsupported frame version 2"),
    (frame(1, nfds=MAX_FDS + 1), "out of bounds"),
    (frame(1, hlen=0, head=b""), "out of bounds"),
    (frame(1, blen=MAX_BODY + 1), "out of bounds"),
    (frame(1, head=b"[1,2]"), "not a JSON object"),
    (frame(1, head=b"\xff\xfe"), "not JSON"),
    (frame(1, head=b"{}", nfds=2), "without its fds"),
])
def test_garbage_frames_are_protocol_errors(data: bytes, why: str) -> None:
    f = Framer()
    f.receive_data(data)
    with pytest.raises(ProtocolError, match=why):
        f.next_frame()


def test_truncated_frame_waits_and_never_invents_a_message() -> None:
    f = Framer()
    f.receive_data(encode(MsgType.READY, {})[:-1])
    assert f.next_frame() is None


# ---- the session table ---------------------------------------------------------------------

def hello(protocols: tuple[int, int] = PROTOCOLS) -> Hello:
    return Hello(1, "t", protocols)


def welcome(protocol: int = PROTOCOLS[1]) -> Welcome:
    return Welcome(2, 1, 0.0, 0.0, "t", protocol)


def rec(i: int, mode: str = "tcp", pending: bytes = b"") -> ConnRecord:
    return ConnRecord(i, "web", mode, "c", "s", PairSnapshot(DirectionSnapshot(pending)))


# The happy path, in order: (sender, event, fds).
SCRIPT: list[tuple[Role, Event, int]] = [
    (Role.NEW, hello(), 0),
    (Role.OLD, welcome(), 0),
    (Role.OLD, Listeners(("web@x", "__metrics__@y")), 2),
    (Role.NEW, Ready(), 0),
    (Role.OLD, Released({}), 0),
    (Role.OLD, Conns((rec(1), rec(2, "http"))), 3),
    (Role.NEW, Ack((2, 1)), 0),
    (Role.OLD, Done({}), 0),
]


def pair() -> tuple[Session, Session]:
    return Session(Role.OLD), Session(Role.NEW)


def deliver(sender: Session, receiver: Session, event: Event, nfds: int = 0) -> Event:
    """Send `event` from `sender` and decode it at `receiver` (fds: fake numbers, never used:
    the receiver's OwnedFds is claimed at once)."""
    data = sender.send(event, list(range(1000, 1000 + nfds)))
    receiver.receive_data(data)
    receiver.receive_fds(list(range(1000, 1000 + nfds)))
    got = receiver.next_event()
    assert got is not None
    ev, fds = got
    assert fds.claim() == list(range(1000, 1000 + nfds))
    return ev


def run_script(old: Session, new: Session, upto: int) -> None:
    for role, event, nfds in SCRIPT[:upto]:
        if role is Role.OLD:
            assert deliver(old, new, event, nfds) == event
        else:
            assert deliver(new, old, event, nfds) == event


def at_released() -> tuple[Session, Session]:
    old, new = pair()
    run_script(old, new, 5)
    return old, new


def test_happy_path_moves_both_roles_alike() -> None:
    old, new = pair()
    states = []
    for i in range(len(SCRIPT)):
        role, event, nfds = SCRIPT[i]
        src, dst = (old, new) if role is Role.OLD else (new, old)
        assert deliver(src, dst, event, nfds) == event
        assert old.state is new.state
        states.append(old.state)
    assert states == [State.GREETING, State.WELCOMED, State.LISTENING, State.READY,
                      State.RELEASED, State.RELEASED, State.RELEASED, State.DONE]
    assert old.version == new.version == PROTOCOLS[1]


def test_byte_literals_of_each_message() -> None:
    old, new = pair()
    assert new.send(Hello(7, "1.0", (1, 2))) == frame(
        1, b'{"pid":7,"version":"1.0","protocols":[1,2]}')
    old.receive_data(frame(1, b'{"pid":7,"version":"1.0","protocols":[1,2]}'))
    assert old.next_event() is not None
    assert old.send(Welcome(9, 3, 1.5, 2.5, "1.1", 2)) == frame(
        2, b'{"pid":9,"generation":3,"signalled_at":1.5,"started_at":2.5,"version":"1.1",'
           b'"protocol":2}')
    assert old.send(Listeners(("web@127.0.0.1:80",)), [5]) == frame(
        3, b'{"listeners":["web@127.0.0.1:80"]}', nfds=1)
    assert Session(Role.NEW).send(Hello(1, "", (1, 2))).startswith(b"PXTK\x00\x01\x00\x01")
    assert old.send(Abort("no", serving=True)) == frame(9, b'{"reason":"no","serving":true}')


def test_conns_body_and_ack_bytes() -> None:
    old, new = at_released()
    data = old.send(Conns((ConnRecord(4, "w", "http", "c", "", PairSnapshot(
        DirectionSnapshot(b"GET /", True))),)), [9])
    assert data == frame(5, b'{"conns":[{"id":4,"listener":"w","mode":"http","client":"c",'
                            b'"server":"","c2u":{"pending":[0,5],"eof":true,"shut":false},'
                            b'"u2c":{"pending":[5,0],"eof":false,"shut":false}}]}',
                         body=b"GET /", nfds=1)
    new.receive_data(data)
    new.receive_fds([9])
    got = new.next_event()
    assert got is not None
    assert new.send(Ack((4,))) == frame(6, b'{"ids":[4]}')
    got[1].claim()


# Every message in every state: legal exactly when the table says so, for both directions.
ALL_EVENTS: list[tuple[MsgType, Event, int]] = [
    (MsgType.HELLO, hello(), 0), (MsgType.WELCOME, welcome(), 0),
    (MsgType.LISTENERS, Listeners(("a",)), 1), (MsgType.READY, Ready(), 0),
    (MsgType.CONNS, Conns((rec(50),)), 2), (MsgType.ACK, Ack((50,)), 0),
    (MsgType.RELEASED, Released({}), 0), (MsgType.DONE, Done({}), 0),
    (MsgType.ABORT, Abort("x"), 0),
]
STATE_AFTER = {0: State.IDLE, 1: State.GREETING, 2: State.WELCOMED, 3: State.LISTENING,
               4: State.READY, 5: State.RELEASED}


@pytest.mark.parametrize("step", list(STATE_AFTER))
@pytest.mark.parametrize(("mtype", "event", "nfds"), ALL_EVENTS, ids=[m.name for m, _, _ in ALL_EVENTS])
def test_every_event_in_every_state(step: int, mtype: MsgType, event: Event, nfds: int) -> None:
    state = STATE_AFTER[step]
    legal = (state, mtype) in TRANSITIONS
    if mtype is MsgType.ACK:
        legal = False  # nothing in flight in these states: an ACK is always out of order
    for sender_role in (Role.OLD, Role.NEW):
        old, new = pair()
        run_script(old, new, step)
        sender, receiver = (old, new) if sender_role is Role.OLD else (new, old)
        allowed = sender_role in SENDER[mtype]
        data = b""
        if allowed and legal:
            data = sender.send(event, list(range(nfds)))
        else:
            with pytest.raises(LocalProtocolError):
                sender.send(event, list(range(nfds)))
            assert sender.state is state  # a refused send changes nothing
            data = _encode(event, nfds)  # the same bytes, sent by a peer that breaks the rules
        before = receiver.state
        receiver.receive_data(data)
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
        receiver.receive_fds(fds)
        if allowed and legal:
            got = receiver.next_event()
            assert got is not None and got[0] == event
            got[1].close()
        else:
            with pytest.raises(ProtocolError):
                receiver.next_event()
            assert receiver.state is before
            assert all(_closed(fd) for fd in fds)  # a refused frame's fds are closed


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    os.close(fd)
    return False


def test_ack_window_and_order() -> None:
    old, new = at_released()
    for i in range(4):
        deliver(old, new, Conns((rec(10 + i),)), 2)
    assert not old.can_send_conns()
    with pytest.raises(LocalProtocolError, match="window"):
        old.send(Conns((rec(20),)), [1, 2])
    with pytest.raises(LocalProtocolError, match="oldest batch"):
        new.send(Ack((11,)))  # out of order
    with pytest.raises(LocalProtocolError, match="not ACKed"):
        old.send(Done({}))
    for i in range(4):
        deliver(new, old, Ack((10 + i,)))
    assert old.can_send_conns() and old.unacked == new.unacked == 0
    deliver(old, new, Done({}))
    assert old.state is new.state is State.DONE


def test_peer_beyond_the_window_or_repeating_ids_is_refused() -> None:
    old, new = at_released()
    for i in range(4):
        deliver(old, new, Conns((rec(i),)), 2)
    bad = Session(Role.OLD)
    bad.state, bad.version, bad.window = State.RELEASED, 2, 99
    new.receive_data(bad.send(Conns((rec(9),)), [1, 2]))
    new.receive_fds([os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_RDONLY)])
    with pytest.raises(ProtocolError, match="window"):
        new.next_event()
    old2, new2 = at_released()
    deliver(old2, new2, Conns((rec(1),)), 2)
    bad.window = 99
    new2.receive_data(bad.send(Conns((rec(1),)), [1, 2]))
    new2.receive_fds([os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_RDONLY)])
    with pytest.raises(ProtocolError, match="already in flight"):
        new2.next_event()


@pytest.mark.parametrize(("ours", "theirs", "picked"), [
    ((1, 2), (1, 2), 2), ((1, 2), (1, 1), 1), ((1, 2), (2, 5), 2), ((2, 3), (1, 1), None),
    ((1, 2), (3, 4), None),
])
def test_version_negotiation(ours: tuple[int, int], theirs: tuple[int, int],
                             picked: int | None) -> None:
    assert negotiate(ours, theirs) == picked
    old, new = Session(Role.OLD, ours), Session(Role.NEW, theirs)
    deliver(new, old, Hello(1, "x", theirs))
    assert old.version == picked
    if picked is None:
        with pytest.raises(LocalProtocolError, match="negotiated"):
            old.send(Welcome(1, 1, 0, 0, "x", ours[1]))
        deliver(old, new, Abort("no common protocol version"))
        assert old.state is new.state is State.ABORTED
    else:
        deliver(old, new, Welcome(1, 1, 0, 0, "x", picked))
        assert new.version == picked


def test_a_welcome_outside_our_offer_is_refused() -> None:
    new = Session(Role.NEW, (1, 2))
    new.send(hello((1, 2)))
    liar = Session(Role.OLD, (3, 3))
    liar.state, liar.version = State.GREETING, 3
    new.receive_data(liar.send(Welcome(1, 1, 0, 0, "x", 3)))
    with pytest.raises(ProtocolError, match="outside our"):
        new.next_event()


def test_protocol_1_peer_hello_and_conns_before_released() -> None:
    """The previous release says HELLO without `protocols` and moves connections between READY
    and RELEASED: protocol 1 allows that, protocol 2 refuses it."""
    old, new = Session(Role.OLD), Session(Role.NEW)
    old.receive_data(frame(1, b'{"pid":5,"version":"0.9"}'))
    got = old.next_event()
    assert got is not None and got[0] == Hello(5, "0.9", (1, 1)) and old.version == 1
    new.send(hello())
    new.receive_data(frame(2, b'{"pid":9,"generation":1,"signalled_at":1,"version":"0.9"}'))
    got = new.next_event()
    assert got is not None and new.version == 1
    v1_old, v1_new = pair()
    run_script(v1_old, v1_new, 2)
    v1_old.version = v1_new.version = 1
    run_script_from(v1_old, v1_new, 2, 4)
    deliver(v1_old, v1_new, Conns((rec(1),)), 2)  # fine in protocol 1
    deliver(v1_new, v1_old, Ack((1,)))
    v2_old, v2_new = pair()
    run_script(v2_old, v2_new, 4)
    with pytest.raises(LocalProtocolError, match="not allowed in state ready"):
        v2_old.send(Conns((rec(1),)), [1, 2])


def run_script_from(old: Session, new: Session, start: int, stop: int) -> None:
    for role, event, nfds in SCRIPT[start:stop]:
        src, dst = (old, new) if role is Role.OLD else (new, old)
        deliver(src, dst, event, nfds)


@pytest.mark.parametrize("mutate", [
    lambda h: h["conns"][0].pop("id"),
    lambda h: h["conns"][0].update(id="1"),
    lambda h: h["conns"][0].update(id=True),
    lambda h: h["conns"][0]["c2u"].update(pending=[0, 999]),
    lambda h: h["conns"][0]["c2u"].update(pending=[-1, 1]),
    lambda h: h["conns"][0]["u2c"].update(eof="yes"),
    lambda h: h["conns"][0].update(mode="udp"),
    lambda h: h.update(conns="x"),
    lambda h: h.update(conns=["x"]),
])
def test_conns_strict_decoding(mutate: object) -> None:
    old, new = at_released()
    data = old.send(Conns((rec(1, pending=b"xy"),)), [3, 4])
    hlen = struct.unpack_from("!I", data, 10)[0]
    head = json.loads(data[HEADER.size:HEADER.size + hlen])
    mutate(head)  # type: ignore[operator]
    new.receive_data(encode(MsgType.CONNS, head, b"xy", 2))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
    new.receive_fds(fds)
    with pytest.raises(ProtocolError):
        new.next_event()
    assert all(_closed(fd) for fd in fds)


def test_conns_fds_per_mode() -> None:
    recs = [rec(1), rec(2, "http", b"GET / HT"), rec(3, "tunnel")]
    got = conns_roundtrip(recs, [3, 4, 5, 6, 7])
    assert [(r.id, fds) for r, fds in got] == [(1, [3, 4]), (2, [5]), (3, [6, 7])]
    assert got[1][0].state.c2u.pending == b"GET / HT"
    for fds in ([3, 4, 5, 6], [3, 4, 5, 6, 7, 8]):
        old, _ = at_released()
        with pytest.raises(LocalProtocolError, match="wrong number of fds"):
            old.send(Conns(tuple(recs)), fds)


def test_metrics_must_be_an_object_of_rows() -> None:
    old, new = pair()
    run_script(old, new, 4)
    new.receive_data(frame(7, b'{"metrics":{"x":5}}'))
    with pytest.raises(ProtocolError, match="metrics"):
        new.next_event()


def test_importing_the_protocol_does_not_import_trio() -> None:
    code = ("import sys, proxy.takeover, proxy.frames, proxy.movable; "
            "sys.exit(1 if 'trio' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---- fd ownership on failure paths, with real sockets -----------------------------------------

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before


def socketpair_fds(n: int) -> list[int]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        out += [a.detach(), b.detach()]
    return out


def test_fds_of_a_frame_that_fails_to_decode_are_closed() -> None:
    with no_fd_leak():
        _old, new = at_released()
        fds = socketpair_fds(1)
        new.receive_data(frame(MsgType.CONNS, b'{"conns":"garbage"}', nfds=2))
        new.receive_fds(fds)
        with pytest.raises(ProtocolError):
            new.next_event()


def test_fds_received_without_a_complete_frame_are_closed_by_close() -> None:
    with no_fd_leak():
        new = Session(Role.NEW)
        new.receive_data(frame(MsgType.LISTENERS, b'{"listeners":["a","b"]}', nfds=2)[:-3])
        new.receive_fds(socketpair_fds(1))
        assert new.next_event() is None
        new.close()


def test_a_consumer_failing_half_way_leaks_nothing() -> None:
    with no_fd_leak():
        fds = socketpair_fds(2)
        owned = OwnedFds(fds)
        socks = []
        with pytest.raises(RuntimeError), owned:
            socks.append(socket.socket(fileno=owned.claim(1)[0]))
            raise RuntimeError("adopt failed after one fd")
        for s in socks:
            s.close()
        assert len(owned) == 0


def test_conns_garbage_from_a_peer_with_real_socketpairs() -> None:
    """The measured bug: {"conns": "garbage"} with two socketpair fds after RELEASED."""
    with no_fd_leak():
        _old, new = at_released()
        a, b = socket.socketpair()
        try:
            sent = socketpair_fds(1)
            a.sendmsg([frame(MsgType.CONNS, b'{"conns":"garbage"}', nfds=2)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", *sent))])
            for fd in sent:  # the sender's own copies go too
                os.close(fd)
            data, anc, _, _ = b.recvmsg(1 << 16, socket.CMSG_SPACE(8))
            received = list(struct.unpack("2i", anc[0][2]))
            new.receive_data(data)
            new.receive_fds(received)
            with pytest.raises(ProtocolError, match="conns"):
                new.next_event()
            assert all(_closed(fd) for fd in received)
        finally:
            a.close()
            b.close()


def test_mutated_frames_fail_only_with_protocol_error() -> None:
    """Random byte and JSON mutations of valid frames (a recorded exchange included): decoding
    either works or raises ProtocolError, never anything else (a hostile peer must not crash the
    serving generation)."""
    import random

    from proxy.framing import BodyFramer
    from proxy.movable import ExchangeState

    rng = random.Random(7)
    x = ExchangeState(phase="response_body", method=b"GET", target=b"/", version=b"1.1",
                      headers=((b"host", b"x"),), up_headers=((b"host", b"x"),),
                      request=BodyFramer.content_length(0).snapshot(),
                      response=BodyFramer.chunked().snapshot(), status=200, client_keep=True,
                      resp_keep=True, server="127.0.0.1:1", elapsed=0.5)
    rec = ConnRecord(9, "web", "http_exchange", "c", "127.0.0.1:1",
                     PairSnapshot(DirectionSnapshot(b"up"), DirectionSnapshot(b"down")), x)
    old, _ = at_released()
    valid = old.send(Conns((rec,)), [1, 2])
    bad_values: list[object] = [None, True, -1, 10**400, 1e308 * 10, "x" * 3, [], {}, [[[[[]]]]], 2**60]
    for _ in range(1500):
        data = bytearray(valid)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(HEADER.size, len(data))] = rng.randrange(256)
        else:
            hlen = struct.unpack_from("!I", data, 10)[0]
            head = json.loads(data[HEADER.size:HEADER.size + hlen])
            target = head["conns"][0]
            while isinstance(target, dict) and rng.random() < 0.6:
                target = target[rng.choice(sorted(target))] if target else target
            if isinstance(target, dict) and target:
                target[rng.choice(sorted(target))] = rng.choice(bad_values)
            elif isinstance(target, list) and target:
                target[rng.randrange(len(target))] = rng.choice(bad_values)
            raw = json.dumps(head).encode()
            data = bytearray(HEADER.pack(b"PXTK", 1, 5, 2, len(raw), 0) + raw)
        _, new = at_released()
        new.receive_data(bytes(data))
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
        new.receive_fds(fds)
        try:
            got = new.next_event()
        except ProtocolError:
            new.close()  # (a frame that failed whole leaves its fds to the session's close)
            assert all(_closed(fd) for fd in fds)
            continue
        if got is None:
            new.close()
        else:
            got[1].close()
