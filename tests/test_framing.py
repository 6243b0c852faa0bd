"""The body-framing tracker: byte-literal tables per state, then the differential test against
h11 (the same bytes to both, split at every point, compared: where the body ends, and errors)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.framing import (
    MAX_LINE,
    BodyFramer,
    FramingError,
    FramingSnapshot,
    Kind,
    Phase,
    framer_for,
    snapshot_problem,
)
from proxy.h11impl import h11

P = Phase

# ---- byte-literal tables ------------------------------------------------------------------------

# Chunked wire bytes so far -> the phase they leave the framer in, and the snapshot's details.
CHUNKED_PHASES: list[tuple[bytes, Phase, dict[str, object]]] = [
    (b"", P.SIZE, {"left": 0, "digits": 0}),
    (b"1", P.SIZE, {"left": 1, "digits": 1, "pending": 1}),
    (b"01aF", P.SIZE, {"left": 0x1AF, "digits": 4, "pending": 4}),
    (b"5 ", P.SIZE_OWS, {"left": 5, "pending": 2}),
    (b"5 \t", P.SIZE_OWS, {"left": 5}),
    (b"5\r", P.SIZE_CR, {"left": 5}),
    (b"5;", P.EXT, {"left": 5}),
    (b'5;a="b;c"', P.EXT, {"left": 5, "pending": 9}),
    (b"5;a\r", P.EXT_CR, {"left": 5}),
    (b"5;a\r\r", P.EXT_CR, {"left": 5}),
    (b"5;a\rb", P.EXT, {"left": 5}),  # h11's chunk-ext is ";.*": a CR not before LF is in it
    (b"5\r\n", P.DATA, {"left": 5, "pending": 0, "consumed": 3, "payload": 0}),
    (b"5\r\nhel", P.DATA, {"left": 2, "payload": 3}),
    (b"5\r\nhello", P.DATA_CR, {"left": 0, "payload": 5}),
    (b"5\r\nhello\r", P.DATA_LF, {}),
    (b"5\r\nhello\r\n", P.SIZE, {"digits": 0, "pending": 0, "consumed": 10}),
    (b"5\r\nhello\r\n1", P.SIZE, {"left": 1, "digits": 1, "pending": 1}),
    (b"2\r\n\r\n\r\n", P.SIZE, {"payload": 2}),  # chunk data may be CRLF itself
    (b"0\r\n", P.TRAILER, {"pending": 0}),
    (b"0;x\r\n", P.TRAILER, {}),
    (b"0\r\n\r", P.BLANK_LF, {"pending": 1}),
    (b"0\r\nX-", P.NAME, {"field": b"X-"}),
    (b"0\r\nX-A:", P.VALUE, {"field": b"X-A:"}),
    (b"0\r\nX-A: 1\r", P.VALUE_LF, {"field": b"X-A: 1"}),
    (b"0\r\nX-A: 1\r\n", P.TRAILER, {"field": b"X-A: 1", "pending": 8}),
    (b"0\r\nX-A: 1\n \t", P.FOLD, {"field": b"X-A: 1 "}),  # h11 joins a fold with one space
    (b"0\r\nX-A: 1\n \t2 ", P.VALUE, {"field": b"X-A: 1 2 "}),
    (b"0\r\nContent-Length: 7\r\n", P.TRAILER,  # a field's checks wait for the next line
     {"field": b"Content-Length: 7", "trailer_length": None}),
    (b"0\r\nContent-Length: 7\r\nX", P.NAME, {"field": b"X", "trailer_length": b"7"}),
    (b"0\r\nTransfer-Encoding: chunked\nX", P.NAME, {"trailer_te": True}),
    (b"0\r\n\r\n", P.DONE, {"consumed": 5, "pending": 0}),
    (b"0\r\n\n", P.DONE, {"consumed": 4}),
    (b"0\r\nX: 1\n\n", P.DONE, {"field": b""}),
    (b"0\r\nX: 1\r\n\n", P.DONE, {}),
    (b"0\r\nX: 1\n\r\n", P.DONE, {}),
    (b"3\r\nabc\r\n0\r\nX: 1\r\n\r\n", P.DONE, {"payload": 3}),
]


@pytest.mark.parametrize(("wire", "phase", "fields"), CHUNKED_PHASES)
def test_chunked_phases(wire: bytes, phase: Phase, fields: dict[str, object]) -> None:
    for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))]):
        f = BodyFramer.chunked()
        for piece in pieces:
            assert f.feed(piece) == (len(piece), f.done)
        snap = f.snapshot()
        assert snap.phase is phase and snap.kind is Kind.CHUNKED
        assert {k: getattr(snap, k) for k in fields} == fields
        assert snap.consumed == len(wire)


# (accepted, refused): the framer takes `accepted` and refuses the first byte of `refused`.
CHUNKED_ERRORS: list[tuple[bytes, bytes]] = [
    (b"", b"-1\r\n"),
    (b"0", b"x5\r\n"),
    (b"5 ", b"5\r\n"),
    (b"", b" 5\r\n"),
    (b"", b"\r\n"),  # no size at all
    (b"", b";x\r\n"),
    (b"", b"g\r\n"),
    (b"5", b"\n"),  # a size line ends in CRLF, never a bare LF
    (b"5\r", b"\r\n"),
    (b"5 ", b";a\r\n"),  # no whitespace before an extension
    (b"5;a", b"\nb\r\n"),
    (b"1" * 20, b"1\r\n"),  # 21 hex digits: h11 allows 20
    (b"0" * 20, b"5\r\n"),  # leading zeros count too
    (b"5\r\nhello", b"X\r\n"),  # no CRLF after the data
    (b"5\r\nhello\r", b"X"),
    (b"5\r\nhello", b"\n0\r\n\r\n"),
    (b"5\r\nhello\r\n", b"\r\n"),
    (b"0\r\n", b" X: 1\r\n\r\n"),  # a continuation line with nothing to continue
    (b"0\r\nX", b" : 1\r\n\r\n"),
    (b"0\r\n", b": 1\r\n\r\n"),
    (b"0\r\nX", b"\r\n\r\n"),  # a line without a colon
    (b"0\r\nX: 1\r", b"\rY: 2\r\n\r\n"),
    (b"0\r\nX: a", b"\x00b\r\n\r\n"),
    (b"0\r\nX: a", b"\x0bb\r\n\r\n"),
    (b"0\r\n\r", b"X"),
    (b"0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r", b"\n"),
    (b"0\r\nContent-Length: 1, 2\r\n", b"X: y\r\n\r\n"),
    (b"0\r\nContent-Length: x\r\n\r", b"\n"),
    (b"0\r\nContent-Length: " + b"1" * 21 + b"\r\n\r", b"\n"),
    (b"0\r\nContent-Length: 5\r\n , 6\r\n\r", b"\n"),  # the fold makes it conflict
    (b"0\r\nTransfer-Encoding: gzip\r\n\r", b"\n"),
    (b"0\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r", b"\n"),
]


@pytest.mark.parametrize(("accepted", "refused"), CHUNKED_ERRORS)
def test_chunked_errors(accepted: bytes, refused: bytes) -> None:
    wire = accepted + refused
    for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))]):
        f = BodyFramer.chunked()
        with pytest.raises(FramingError):
            for piece in pieces:
                f.feed(piece)
        assert f.consumed == len(accepted)
        with pytest.raises(FramingError):  # a failed framer stays failed
            f.feed(b"0\r\n\r\n")
        with pytest.raises(FramingError):
            f.snapshot()


def test_chunked_error_hints_and_eof() -> None:
    f = BodyFramer.chunked()
    with pytest.raises(FramingError) as exc:
        f.feed(b"0\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert exc.value.status_hint == 501
    f = BodyFramer.chunked()
    assert f.feed(b"5\r\nhel") == (6, False)
    with pytest.raises(FramingError, match="without sending complete"):
        f.eof()


def test_limit_is_checked_per_read_like_h11() -> None:
    """An incomplete size line (or trailer section) may hold max_line bytes at the end of a read;
    one that completes within the read is not limited (h11's max_incomplete_event_size)."""
    line = b"5;" + b"x" * 10
    assert BodyFramer.chunked(max_line=8).feed(line + b"\r\nhello\r\n0\r\n\r\n") == (26, True)
    f = BodyFramer.chunked(max_line=8)
    assert f.feed(line[:8]) == (8, False)
    with pytest.raises(FramingError) as exc:
        f.feed(line[8:9])
    assert exc.value.status_hint == 431 and f.consumed == 9
    f = BodyFramer.chunked(max_line=8)
    assert f.feed(b"0\r\nX: 1234") == (10, False)  # the trailer section counts from after 0\r\n
    with pytest.raises(FramingError, match="trailer section"):
        f.feed(b"5\r")


@pytest.mark.parametrize(("framer", "pieces", "results"), [
    (BodyFramer.content_length(5), [b"he", b"llo", b"GET"], [(2, False), (3, True), (0, True)]),
    (BodyFramer.content_length(5), [b"helloGET"], [(5, True)]),
    (BodyFramer.content_length(0), [b"GET"], [(0, True)]),
    (BodyFramer.content_length(3), [b"", b"abc"], [(0, False), (3, True)]),
    (BodyFramer.until_eof(), [b"abc", b"\r\n0\r\n"], [(3, False), (5, False)]),
])
def test_length_and_eof_bodies(framer: BodyFramer, pieces: list[bytes],
                               results: list[tuple[int, bool]]) -> None:
    assert [framer.feed(p) for p in pieces] == results
    assert framer.payload == framer.consumed == sum(n for n, _ in results)


def test_eof_ends_only_an_until_eof_body() -> None:
    f = BodyFramer.until_eof()
    f.feed(b"abc")
    f.eof()
    assert f.done and f.snapshot() == FramingSnapshot(Kind.EOF, P.DONE, consumed=3, payload=3)
    BodyFramer.content_length(0).eof()  # nothing left: fine
    f = BodyFramer.content_length(4)
    f.feed(b"abc")
    with pytest.raises(FramingError):
        f.eof()


H = list[tuple[bytes, bytes]]


@pytest.mark.parametrize(("method", "headers", "status", "kind", "length"), [
    (b"POST", [(b"content-length", b"7")], None, Kind.LENGTH, 7),
    (b"POST", [(b"transfer-encoding", b"chunked")], None, Kind.CHUNKED, 0),
    (b"POST", [(b"content-length", b"7"), (b"transfer-encoding", b"Chunked")], None,
     Kind.CHUNKED, 0),  # Transfer-Encoding beats Content-Length
    (b"GET", [], None, Kind.LENGTH, 0),
    (b"GET", [(b"content-length", b"3, 3")], 200, Kind.LENGTH, 3),
    (b"GET", [], 200, Kind.EOF, 0),
    (b"GET", [(b"transfer-encoding", b"chunked")], 200, Kind.CHUNKED, 0),
    (b"HEAD", [(b"content-length", b"9")], 200, Kind.LENGTH, 0),
    (b"GET", [(b"content-length", b"9")], 204, Kind.LENGTH, 0),
    (b"GET", [(b"transfer-encoding", b"chunked")], 304, Kind.LENGTH, 0),
    (b"CONNECT", [], 200, Kind.LENGTH, 0),
    (b"CONNECT", [], 407, Kind.EOF, 0),
])
def test_framer_for(method: bytes, headers: H, status: int | None, kind: Kind,
                    length: int) -> None:
    f = framer_for(method, headers, status)
    assert f.kind is kind and f.snapshot().left == length and f.done is (
        kind is Kind.LENGTH and length == 0)


@pytest.mark.parametrize("snap", [
    FramingSnapshot(Kind.LENGTH, P.SIZE),
    FramingSnapshot(Kind.LENGTH, P.DATA, left=0),
    FramingSnapshot(Kind.LENGTH, P.DONE, left=3),
    FramingSnapshot(Kind.EOF, P.DATA, left=3),
    FramingSnapshot(Kind.CHUNKED, P.DATA, left=0),
    FramingSnapshot(Kind.CHUNKED, P.SIZE, left=16, digits=1, pending=1, consumed=1),
    FramingSnapshot(Kind.CHUNKED, P.SIZE, digits=21),
    FramingSnapshot(Kind.CHUNKED, P.DATA_CR, left=1),
    FramingSnapshot(Kind.CHUNKED, P.SIZE, pending=5, consumed=4),
    FramingSnapshot(Kind.CHUNKED, P.SIZE, pending=9, consumed=90, max_line=8),
    FramingSnapshot(Kind.CHUNKED, P.DATA, left=1, payload=2, consumed=1),
    FramingSnapshot(Kind.CHUNKED, P.DATA, left=-1),
    FramingSnapshot(Kind.CHUNKED, P.SIZE, field=b"X:"),
    FramingSnapshot(Kind.CHUNKED, P.NAME, field=b"X:", consumed=9),
    FramingSnapshot(Kind.CHUNKED, P.VALUE, field=b"X", consumed=9),
    FramingSnapshot(Kind.CHUNKED, P.VALUE, consumed=9),
    FramingSnapshot(Kind.CHUNKED, P.DONE, field=b"X: 1", consumed=9),
    FramingSnapshot(Kind.CHUNKED, P.TRAILER, trailer_length=b"x", consumed=9),
])
def test_impossible_snapshots_are_refused(snap: FramingSnapshot) -> None:
    assert snapshot_problem(snap) is not None
    with pytest.raises(ValueError, match="bad framing snapshot"):
        BodyFramer.from_snapshot(snap)


# ---- the differential test against h11 ------------------------------------------------------------

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
NEXT_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REQ_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\n"
RESP_HEAD = b"HTTP/1.1 200 OK\r\n"
TE = b"Transfer-Encoding: chunked\r\n\r\n"


@dataclass(frozen=True)
class Case:
    """One message: its head, then the bytes after it (its body and the next message)."""

    head: bytes
    wire: bytes
    method: bytes = b"GET"  # a response's request method
    max_line: int = MAX_LINE

    @property
    def response(self) -> bool:
        return self.head.startswith(b"HTTP/")


Outcome = tuple[str, int]  # ("end", body length on the wire) or ("error", bytes in when raised)

VALID_CHUNKED = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;foo=bar\r\nhello\r\n0\r\n\r\n",
    b'5;foo="b;a r" ;x\r\nhello\r\n0;last\r\n\r\n',
    b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
    b"1f\r\n" + b"y" * 31 + b"\r\n1F\r\n" + b"z" * 31 + b"\r\n0\r\n\r\n",
    b"00005\r\nhello\r\n000\r\n\r\n",
    b"0" * 19 + b"5\r\nhello\r\n0\r\n\r\n",  # 20 digits: h11's most
    b"5 \t\r\nhello\r\n0  \r\n\r\n",  # whitespace before CRLF: h11 is lenient there
    b"5;\r\nhello\r\n0\r\n\r\n",
    b"5;a\rb\r\nhello\r\n0;\r\r\n\r\n",  # a CR inside an extension
    b"2\r\n\r\n\r\n0\r\n\r\n",
    b"0\r\n\r\n",
    b"0\r\nX-Sum: abc\r\n\r\n",
    b"0\r\nX-Sum: abc\r\nX-B:\r\nx-c:  \t \r\n\r\n",
    b"0\r\nX-Sum: a\r\n  b\r\n\t c\r\n \r\n\r\n",  # obsolete line folding
    b"0\r\nX-A: 1\n\n",
    b"0\r\n\n",
    b"0\r\nX-A: 1\r\n\n",
    b"0\r\nX-A: 1\n\r\n",
    b"0\r\nContent-Length: 5\r\ncontent-length: 5, 5\r\n\r\n",
    b"0\r\nContent-Length:\r\n 5\r\n\r\n",
    b"0\r\nTransfer-Encoding: Chunked\r\n\r\n",
    b"0\r\nX-A: \x01\x7f\x80\xff\r\n\r\n",
    b"0\r\n!#$%&'*+-.^_`|~09azAZ: v\r\n\r\n",
]
BAD_CHUNKED = [
    b"-1\r\nx\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"5 5\r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",
    b";x\r\nhello\r\n0\r\n\r\n",
    b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n",
    b"1" + b"0" * 20 + b"\r\nhello\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\r\rhello\r\n0\r\n\r\n",
    b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    b"5 ;a\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloX\r\n0\r\n\r\n",
    b"5\r\nhello\rX0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",
    b"5\r\nhello\r\n\r\n",
    b"0\r\n X: 1\r\n\r\n",
    b"0\r\nX 1\r\n\r\n",
    b"0\r\n: 1\r\n\r\n",
    b"0\r\nX\r\n\r\n",
    b"0\r\nX: 1\r\rY: 2\r\n\r\n",
    b"0\r\nX: a\x00b\r\n\r\n",
    b"0\r\nX: a\x0cb\r\n\r\n",
    b"0\r\n\rX\r\n\r\n",
    b"0\r\nX: 1\r\n\r",  # then the next message's first byte
    b"0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"0\r\nContent-Length: 1, 2\r\n\r\n",
    b"0\r\nContent-Length: ,\r\n\r\n",
    b"0\r\nContent-Length: x\r\n\r\n",
    b"0\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n",
    b"0\r\nContent-Length: 5\r\n , 6\r\n\r\n",
    b"0\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"0\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
]
TRUNCATED_CHUNKED = [  # the peer closes inside the body: only EOF decides
    b"5\r\nhel",
    b"5;ext",
    b"F" * 20 + b"\r\nhuge",
    b"0\r\nX: 1\r\n",
]
LONG = b"x" * 70  # beyond the 64-byte limit used with it, under h11's default
LONG_CHUNKED = [  # split-dependent in h11 as here: an incomplete line may not exceed the limit
    b"5;" + LONG + b"\r\nhello\r\n0\r\n\r\n",
    b"5" + b" " * 70 + b"\r\nhello\r\n0\r\n\r\n",
    b"0\r\nX: " + LONG + b"\r\n\r\n",
    b"0\r\nX: 1\r\n" * 12 + b"\r\n",
]

CASES: list[Case] = [
    *(Case(REQ_HEAD + TE, body + NEXT_REQUEST) for body in VALID_CHUNKED + BAD_CHUNKED),
    *(Case(RESP_HEAD + TE, body + NEXT_RESPONSE) for body in VALID_CHUNKED + BAD_CHUNKED),
    *(Case(REQ_HEAD + TE, body) for body in TRUNCATED_CHUNKED),
    *(Case(RESP_HEAD + TE, body) for body in TRUNCATED_CHUNKED),
    *(Case(REQ_HEAD + TE, body + NEXT_REQUEST, max_line=64) for body in LONG_CHUNKED),
    *(Case(RESP_HEAD + TE, body + NEXT_RESPONSE, max_line=64) for body in LONG_CHUNKED),
    Case(REQ_HEAD + b"Content-Length: 5\r\n\r\n", b"hello" + NEXT_REQUEST),
    Case(REQ_HEAD + b"Content-Length: 0\r\n\r\n", NEXT_REQUEST),
    Case(REQ_HEAD + b"\r\n", NEXT_REQUEST),
    Case(REQ_HEAD + b"Content-Length: 9\r\n\r\n", b"hello"),
    Case(RESP_HEAD + b"Content-Length: 5\r\n\r\n", b"hello" + NEXT_RESPONSE),
    Case(RESP_HEAD + b"Content-Length: 5\r\n\r\n", b"hel"),
    Case(RESP_HEAD + b"\r\n", b"all of it\r\n0\r\n\r\n" + NEXT_RESPONSE),
    Case(b"HTTP/1.0 200 OK\r\n\r\n", b"until the end"),
    Case(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", NEXT_RESPONSE),
    Case(RESP_HEAD + b"Content-Length: 5\r\n\r\n", NEXT_RESPONSE, method=b"HEAD"),
    Case(b"HTTP/1.1 304 Not Modified\r\n" + TE, NEXT_RESPONSE),
]


@functools.cache
def parsed_head(case: Case) -> h11.Request | h11.Response:
    return _h11_with_head(case)[1]


def _h11_with_head(case: Case) -> tuple[h11.Connection, h11.Request | h11.Response]:
    conn = h11.Connection(h11.CLIENT if case.response else h11.SERVER,
                          max_incomplete_event_size=case.max_line)
    if case.response:
        conn.send(h11.Request(method=case.method, target=b"/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
    conn.receive_data(case.head)
    head = conn.next_event()
    assert isinstance(head, h11.Request | h11.Response)
    return conn, head


def via_h11(case: Case, pieces: Sequence[bytes]) -> Outcome:
    """Feed h11 the pieces, then EOF: where EndOfMessage came, or how far in it raised."""
    conn, _ = _h11_with_head(case)
    fed = 0
    try:
        for piece in [*pieces, b""]:  # b"": EOF
            conn.receive_data(piece)
            fed += len(piece)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.EndOfMessage):
                    return ("end", fed - len(conn.trailing_data[0]))
                if event is h11.NEED_DATA:
                    break
                assert isinstance(event, h11.Data)
    except h11.RemoteProtocolError:
        return ("error", fed)
    raise AssertionError("h11 neither ended the body nor raised at EOF")


def via_framer(case: Case, pieces: Sequence[bytes], restore: bool = False) -> Outcome:
    """Feed the framer the pieces, then EOF; with `restore`, moving it (snapshot, from_snapshot)
    between every two pieces."""
    head = parsed_head(case)
    if isinstance(head, h11.Response):
        f = framer_for(case.method, list(head.headers), head.status_code, max_line=case.max_line)
    else:
        f = framer_for(head.method, list(head.headers), max_line=case.max_line)
    try:
        for piece in pieces:
            n, done = f.feed(piece)
            assert n == len(piece) or done
            if done:
                return ("end", f.consumed)
            if restore:
                snap = f.snapshot()
                f = BodyFramer.from_snapshot(snap)
                assert f.snapshot() == snap
        f.eof()
        return ("end", f.consumed)
    except FramingError:
        return ("error", f.consumed)


def agree(case: Case, pieces: Sequence[bytes]) -> Outcome:
    pieces = [p for p in pieces if p]
    theirs, ours = via_h11(case, pieces), via_framer(case, pieces)
    assert ours[0] == theirs[0], (case, pieces, theirs, ours)
    if ours[0] == "end":
        assert ours == theirs, (case, pieces)
    else:  # we refuse at the first byte no body can continue from; h11 at a line's end
        assert ours[1] <= theirs[1], (case, pieces, theirs, ours)
    return ours


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


def case_id(case: Case) -> str:
    return repr(case.head[:9] + case.wire[:24])[2:-1]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_agrees_with_h11_at_every_split(case: Case) -> None:
    wire = case.wire
    whole = agree(case, [wire])
    assert agree(case, [wire[i:i + 1] for i in range(len(wire))]) == whole or (
        case.max_line < MAX_LINE)  # the limit depends on the split
    for k in range(len(wire) + 1):
        outcome = agree(case, [wire[:k], wire[k:]])
        # moved at the split (and at every byte in the loop below): the same result
        assert via_framer(case, [wire[:k], wire[k:]], restore=True) == outcome
    assert via_framer(case, [wire[i:i + 1] for i in range(len(wire))], restore=True) == (
        via_framer(case, [wire[i:i + 1] for i in range(len(wire))]))


def test_the_cases_cover_both_verdicts() -> None:
    verdicts = {case: via_framer(case, [case.wire])[0] for case in CASES}
    assert all(verdicts[c] == "end" for c in CASES if any(
        c.wire.startswith(b) for b in VALID_CHUNKED) and c.max_line == MAX_LINE)
    assert all(verdicts[Case(REQ_HEAD + TE, b + NEXT_REQUEST)] == "error" for b in BAD_CHUNKED)
    assert all(verdicts[Case(REQ_HEAD + TE, b)] == "error" for b in TRUNCATED_CHUNKED)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CASES), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_agrees_with_h11_at_random_splits(case: Case, cuts: list[int]) -> None:
    wire = case.wire
    pieces = split(wire, cuts)
    outcome = agree(case, pieces)
    assert via_framer(case, pieces, restore=True) == outcome


# Generated chunked bodies: well-formed ones from the grammar's pieces, then sometimes one byte
# changed, added or dropped, so both verdicts and every state get their turn.
_EXT = st.one_of(st.just(b""), st.sampled_from([b";a=1", b' ;x="y"', b";\r"]),
                 st.binary(max_size=6).map(lambda b: b";" + b.replace(b"\n", b"")))
_OWS = st.sampled_from([b"", b" ", b"\t ", b"\r"])
_FIELD = st.sampled_from([b"X-A: 1", b"content-length: 3", b"Content-Length: 4", b"x:",
                          b"transfer-encoding: chunked", b" folded", b"\tv", b"X-B: \x80 z",
                          b"bad line", b"X: a\rb"])
_EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = bytearray()
    for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3)):
        size = draw(st.sampled_from(["{:x}", "{:X}", "{:03x}"])).format(len(data)).encode()
        out += size + draw(_EXT) + draw(_OWS) + b"\r\n" + data + b"\r\n"
    out += b"0" + draw(_EXT) + b"\r\n"
    for _ in range(draw(st.integers(0, 3))):
        out += draw(_FIELD) + draw(_EOL)
    out += draw(_EOL)
    if draw(st.booleans()) and out:
        at = draw(st.integers(0, len(out) - 1))
        byte = bytes([draw(st.sampled_from(b"\r\n \t;:0aFgx-\x00"))])
        edit = draw(st.sampled_from(["set", "insert", "drop"]))
        tail = out[at + 1:] if edit != "insert" else out[at:]
        out = out[:at] + (b"" if edit == "drop" else byte) + tail
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.booleans(),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_generated_chunked_bodies_agree_with_h11(body: bytes, response: bool,
                                                 cuts: list[int]) -> None:
    case = (Case(RESP_HEAD + TE, body + NEXT_RESPONSE) if response
            else Case(REQ_HEAD + TE, body + NEXT_REQUEST))
    wire = case.wire
    pieces = split(wire, cuts)
    outcome = agree(case, pieces)
    assert agree(case, [wire]) == outcome
    assert via_framer(case, pieces, restore=True) == outcome


def test_snapshot_fields_are_plain_data() -> None:
    f = BodyFramer.chunked()
    f.feed(b"0\r\nContent-Length: 3\r\nX: 1\n ")
    snap = f.snapshot()
    assert replace(snap) == snap and BodyFramer.from_snapshot(snap).snapshot() == snap
    assert {type(v) for v in vars(snap).values()} <= {Kind, Phase, int, bytes, bool}
