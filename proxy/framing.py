"""Where one HTTP/1.1 message body ends on the wire: pure rules beside h11, bytes in, counts out.

h11 parses every request and response head and validates its framing headers; from the end of
the head on, a `BodyFramer` follows that message's body bytes instead of h11's body readers. It
owns two answers: how many of the bytes given belong to this body - its wire bytes, chunk-size
lines, extensions, CRLFs and trailers included, so the proxy can forward them verbatim - and
whether the framing is valid (`FramingError` when not). The bytes after the body belong to the
next (pipelined) message and go back to h11. It decodes nothing: chunk extensions and trailers
are checked as h11 checks them and forwarded as they are.

Why beside h11 and not inside it: a connection paused mid-body moves to another process as plain
data (`FramingSnapshot`), never as h11's private reader objects, and a body whose framing is
known needs no copy through h11's Data events.

States (`Phase`, per `Kind`; `left` is the one number that matters in each):

    kind      phase      reading                                            left
    LENGTH    DATA       the rest of a Content-Length body                  bytes to go
    EOF       DATA       everything until the peer closes (a response)      -
    CHUNKED   SIZE       the hex digits of a chunk-size line                size so far
              SIZE_OWS   whitespace after the size, up to CR                size
              SIZE_CR    the LF ending the size line                        size
              EXT        a chunk extension (';' up to CRLF)                 size
              EXT_CR     LF (ends the line) or more extension               size
              DATA       chunk data                                         bytes to go
              DATA_CR    the CR after chunk data                            -
              DATA_LF    the LF after chunk data                            -
              TRAILER    the start of a trailer line, or of the blank one   -
              BLANK_LF   the LF of the blank line that ends the trailers    -
              NAME       a trailer field name, up to ':'                    -
              VALUE      a trailer field value, up to the line end          -
              VALUE_LF   the LF after a value's CR                          -
              FOLD       leading whitespace of a continuation line          -
    any       DONE       nothing: the message ended

Agreement with h11 (0.16; tests/test_framing.py feeds both the same bytes at every split):

- a body h11 accepts ends at the same byte here, however the bytes are split into reads;
- h11 refuses a body (at EOF at the latest) exactly when this refuses it;
- this refuses at the first byte no valid body can continue from, where h11 waits for the end of
  a size line or of the whole trailer section: so every byte reported as part of the body keeps
  what was forwarded a prefix of a body h11 accepts. The one exception is a trailer field's
  meaning (conflicting or bad Content-Length, Transfer-Encoding other than one `chunked`), known
  when the field ends: the next line starts. (Why not wait for the line as h11 does: the proxy
  forwards what this accepts as it arrives, and a lenient upstream could read a line h11 refuses,
  `0\n` say, as the last chunk and take what follows for a request of its own.)
- limits as h11's: at most 20 hex digits of chunk size (`_abnf.chunk_size`); a size line, or the
  trailer section, still incomplete at the end of a read may hold at most `max_line` bytes
  (h11's `max_incomplete_event_size`, 16 KiB by default, checked the same way: per read, so a
  longer line that arrives whole in one read passes, in h11 as here).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

MAX_LINE = 16 * 1024  # h11's DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
MAX_SIZE_DIGITS = 20  # h11 _abnf: chunk_size = HEXDIG{1,20}
MAX_LENGTH_DIGITS = 20  # h11 _headers: CONTENT_LENGTH_MAX_DIGITS

CR, LF, SP, HT, SEMI, COLON = 0x0D, 0x0A, 0x20, 0x09, 0x3B, 0x3A
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
# h11 _abnf: token = [-!#$%&'*+.^_`|~0-9a-zA-Z]+ ; after the colon any mix of SP/HTAB and
# field-vchar = [^\x00\s] is a valid value with its optional whitespace, i.e. any byte but these:
_TOKEN_RUN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE_RUN = re.compile(rb"[^\x00\n\r\x0b\x0c]+")
_EXT_RUN = re.compile(rb"[^\r\n]+")  # h11: chunk_ext = ";.*" (anything but LF, CR included)
_DIGITS = re.compile(rb"[0-9]+")


class Kind(Enum):
    LENGTH = "length"  # Content-Length n (n = 0: no body)
    CHUNKED = "chunked"
    EOF = "eof"  # a response without length: the body ends when the peer closes


class Phase(Enum):
    DATA = "data"
    SIZE = "size"
    SIZE_OWS = "size_ows"
    SIZE_CR = "size_cr"
    EXT = "ext"
    EXT_CR = "ext_cr"
    DATA_CR = "data_cr"
    DATA_LF = "data_lf"
    TRAILER = "trailer"
    BLANK_LF = "blank_lf"
    NAME = "name"
    VALUE = "value"
    VALUE_LF = "value_lf"
    FOLD = "fold"
    DONE = "done"


_SIZE_LINE = frozenset({Phase.SIZE, Phase.SIZE_OWS, Phase.SIZE_CR, Phase.EXT, Phase.EXT_CR})
_TRAILERS = frozenset({Phase.TRAILER, Phase.BLANK_LF, Phase.NAME, Phase.VALUE, Phase.VALUE_LF,
                       Phase.FOLD})
_LINE = _SIZE_LINE | _TRAILERS  # what h11 buffers whole before parsing: bounded by max_line
_CHUNKED = _LINE | {Phase.DATA, Phase.DATA_CR, Phase.DATA_LF, Phase.DONE}


class FramingError(Exception):
    """The body's framing is malformed (h11 would raise RemoteProtocolError). `status_hint` is
    the status h11 would suggest: 400, 431 for an over-long line, 501 for a bad Transfer-Encoding
    trailer."""

    def __init__(self, msg: str, status_hint: int = 400) -> None:
        super().__init__(msg)
        self.status_hint = status_hint


@dataclass(frozen=True)
class FramingSnapshot:
    """A body's framing position as plain values: `BodyFramer.from_snapshot` carries on exactly
    where `snapshot()` stopped. Fields beyond kind/phase/left keep their defaults outside the
    states that use them."""

    kind: Kind
    phase: Phase
    left: int = 0  # see the module's table
    digits: int = 0  # SIZE line: hex digits read so far
    pending: int = 0  # size line or trailer section: bytes read of it (h11's buffer, max_line)
    field: bytes = b""  # trailers: the field being read, continuation lines joined as h11 does
    trailer_length: bytes | None = None  # trailers: the Content-Length value seen, to compare
    trailer_te: bool = False  # trailers: a Transfer-Encoding field was seen
    consumed: int = 0  # wire bytes of this body so far
    payload: int = 0  # of which payload (Content-Length or chunk data)
    max_line: int = MAX_LINE


class BodyFramer:
    """Follows one message body. Contract of `feed`: give it the bytes that arrive after the
    head (and after what it consumed before); it returns (n, done): data[:n] belongs to this
    body, and when done the message ended there and data[n:] is the next message's. While not
    done, n == len(data). A FramingError leaves the framer failed: feed, eof and snapshot raise
    it again. `consumed` / `payload` count the body's wire / payload bytes accepted so far (on an
    error: up to the offending byte)."""

    def __init__(self, kind: Kind, length: int = 0, *, max_line: int = MAX_LINE) -> None:
        if length < 0 or (kind is not Kind.LENGTH and length):
            raise ValueError(f"length {length} for a {kind.value} body")
        self.kind = kind
        self.max_line = max_line
        self.consumed = 0
        self.payload = 0
        self._left = length
        self._phase = Phase.DATA
        if kind is Kind.CHUNKED:
            self._phase = Phase.SIZE
        elif kind is Kind.LENGTH and length == 0:
            self._phase = Phase.DONE
        self._digits = 0
        self._mark = 0  # `consumed` where the current size line / trailer section began
        self._field = bytearray()
        self._trailer_length: bytes | None = None
        self._trailer_te = False
        self._failed: FramingError | None = None

    @classmethod
    def content_length(cls, n: int) -> BodyFramer:
        return cls(Kind.LENGTH, n)

    @classmethod
    def chunked(cls, *, max_line: int = MAX_LINE) -> BodyFramer:
        return cls(Kind.CHUNKED, max_line=max_line)

    @classmethod
    def until_eof(cls) -> BodyFramer:
        return cls(Kind.EOF)

    @property
    def done(self) -> bool:
        return self._phase is Phase.DONE

    @property
    def phase(self) -> Phase:
        return self._phase

    # ---- feeding -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[int, bool]:
        """How many bytes of `data` belong to this body, and whether it ended there."""
        if self._failed is not None:
            raise self._failed
        if self._phase is Phase.DONE or not data:
            return 0, self._phase is Phase.DONE
        if self.kind is Kind.CHUNKED:
            n = self._chunked(data)
        else:
            n = len(data)
            if self.kind is Kind.LENGTH:
                n = min(self._left, n)
                self._left -= n
                if self._left == 0:
                    self._phase = Phase.DONE
            self.payload += n
            self.consumed += n
        return n, self._phase is Phase.DONE

    def eof(self) -> None:
        """The peer closed. Ends an until-EOF body; anywhere else but DONE a FramingError."""
        if self._failed is not None:
            raise self._failed
        if self.kind is Kind.EOF:
            self._phase = Phase.DONE
        elif self._phase is not Phase.DONE:
            self._fail("peer closed connection without sending complete message body")

    def _fail(self, msg: str, status_hint: int = 400) -> NoReturn:
        self._failed = FramingError(msg, status_hint)
        raise self._failed

    def _chunked(self, data: bytes) -> int:
        """Consume chunked framing from data: the index where the body ended, or len(data)."""
        i, n = 0, len(data)
        base = self.consumed
        ph = self._phase
        try:
            while i < n:
                if ph is Phase.DATA:
                    take = min(self._left, n - i)
                    i += take
                    self.payload += take
                    self._left -= take
                    if self._left == 0:
                        ph = Phase.DATA_CR
                    continue
                b = data[i]
                if ph is Phase.SIZE:
                    v = _HEX.get(b)
                    if v is not None:
                        if self._digits == MAX_SIZE_DIGITS:
                            self._fail(f"chunk size longer than {MAX_SIZE_DIGITS} hex digits")
                        self._left = self._left * 16 + v
                        self._digits += 1
                    elif self._digits == 0:
                        self._fail(f"illegal chunk header: no chunk size before {bytes([b])!r}")
                    elif b == SEMI:
                        ph = Phase.EXT
                    elif b in (SP, HT):
                        ph = Phase.SIZE_OWS
                    elif b == CR:
                        ph = Phase.SIZE_CR
                    else:
                        self._fail(f"illegal chunk header: {bytes([b])!r} after the size")
                elif ph is Phase.SIZE_OWS:
                    if b == CR:
                        ph = Phase.SIZE_CR
                    elif b not in (SP, HT):
                        self._fail(f"illegal chunk header: {bytes([b])!r} after whitespace")
                elif ph is Phase.SIZE_CR or ph is Phase.EXT_CR:
                    if b == LF:
                        ph = self._size_line_done(base + i + 1)
                    elif ph is Phase.SIZE_CR:
                        self._fail("illegal chunk header: CR without LF")
                    elif b != CR:
                        ph = Phase.EXT
                elif ph is Phase.EXT:
                    if b == CR:
                        ph = Phase.EXT_CR
                    elif b == LF:
                        self._fail("illegal chunk header: LF without CR")
                    else:
                        m = _EXT_RUN.match(data, i)
                        assert m is not None
                        i = m.end()
                        continue
                elif ph is Phase.DATA_CR or ph is Phase.DATA_LF:
                    want = CR if ph is Phase.DATA_CR else LF
                    if b != want:
                        self._fail(f"malformed chunk footer: {bytes([b])!r} (expected "
                                   f"{bytes([want])!r})")
                    if ph is Phase.DATA_CR:
                        ph = Phase.DATA_LF
                    else:
                        ph = Phase.SIZE
                        self._digits = 0
                        self._mark = base + i + 1
                elif ph is Phase.TRAILER:
                    if b == LF:
                        self._field_done()
                        ph = Phase.DONE
                    elif b == CR:
                        ph = Phase.BLANK_LF
                    elif b in (SP, HT):
                        if not self._field:
                            self._fail("continuation line at start of trailers")
                        self._field.append(SP)
                        ph = Phase.FOLD
                    elif (m := _TOKEN_RUN.match(data, i)) is not None:
                        self._field_done()
                        self._field += m.group()
                        i = m.end()
                        ph = Phase.NAME
                        continue
                    else:
                        self._fail(f"illegal trailer line: starts with {bytes([b])!r}")
                elif ph is Phase.BLANK_LF:
                    if b != LF:
                        self._fail("illegal trailer line: CR without LF")
                    self._field_done()
                    ph = Phase.DONE
                elif ph is Phase.NAME:
                    if b == COLON:
                        self._field.append(b)
                        ph = Phase.VALUE
                    elif (m := _TOKEN_RUN.match(data, i)) is not None:
                        self._field += m.group()
                        i = m.end()
                        continue
                    else:
                        self._fail(f"illegal trailer name: {bytes([b])!r}")
                elif ph is Phase.VALUE or ph is Phase.FOLD:
                    if b == CR:
                        ph = Phase.VALUE_LF
                    elif b == LF:
                        ph = Phase.TRAILER
                    elif ph is Phase.FOLD and b in (SP, HT):
                        pass
                    elif (m := _VALUE_RUN.match(data, i)) is not None:
                        self._field += m.group()
                        i = m.end()
                        ph = Phase.VALUE
                        continue
                    else:
                        self._fail(f"illegal trailer value: {bytes([b])!r}")
                elif ph is Phase.VALUE_LF:
                    if b != LF:
                        self._fail("illegal trailer line: CR without LF")
                    ph = Phase.TRAILER
                else:  # pragma: no cover - DONE ends the loop
                    raise AssertionError(ph)
                i += 1
                if ph is Phase.DONE:
                    break
        finally:
            self._phase = ph
            self.consumed = base + i
        if ph in _LINE and self.consumed - self._mark > self.max_line:
            what = "chunk size line" if ph in _SIZE_LINE else "trailer section"
            self._fail(f"{what} longer than {self.max_line} bytes and still incomplete", 431)
        return i

    def _size_line_done(self, at: int) -> Phase:
        self._mark = at
        if self._left:
            return Phase.DATA
        return Phase.TRAILER  # the last chunk: the trailer section starts, one buffer for h11

    def _field_done(self) -> None:
        """A trailer field ended (the next line is not a continuation): h11's header rules."""
        if not self._field:
            return
        name, _, value = bytes(self._field).partition(b":")
        self._field.clear()
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                self._fail("conflicting Content-Length trailers")
            length = lengths.pop()
            if not _DIGITS.fullmatch(length) or len(length) > MAX_LENGTH_DIGITS:
                self._fail("bad Content-Length trailer")
            if self._trailer_length is None:
                self._trailer_length = length
            elif self._trailer_length != length:
                self._fail("conflicting Content-Length trailers")
        elif name == b"transfer-encoding":
            if self._trailer_te:
                self._fail("multiple Transfer-Encoding trailers", 501)
            if value.lower() != b"chunked":
                self._fail("only Transfer-Encoding: chunked is supported", 501)
            self._trailer_te = True

    # ---- moving ---------------------------------------------------------------------------------

    def snapshot(self) -> FramingSnapshot:
        if self._failed is not None:
            raise self._failed
        ph = self._phase
        return FramingSnapshot(
            kind=self.kind, phase=ph, left=self._left,
            digits=self._digits if ph is Phase.SIZE else 0,
            pending=self.consumed - self._mark if ph in _LINE else 0,
            field=bytes(self._field), trailer_length=self._trailer_length,
            trailer_te=self._trailer_te, consumed=self.consumed, payload=self.payload,
            max_line=self.max_line)

    @classmethod
    def from_snapshot(cls, snap: FramingSnapshot) -> BodyFramer:
        """The framer `snap` was taken of. ValueError if the snapshot is not one a framer could
        have produced (it may come from another process: decode strictly)."""
        problem = snapshot_problem(snap)
        if problem:
            raise ValueError(f"bad framing snapshot: {problem}")
        f = cls(snap.kind, max_line=snap.max_line)
        f._phase = snap.phase
        f._left = snap.left
        f._digits = snap.digits
        f.consumed = snap.consumed
        f.payload = snap.payload
        f._mark = snap.consumed - snap.pending
        f._field = bytearray(snap.field)
        f._trailer_length = snap.trailer_length
        f._trailer_te = snap.trailer_te
        return f


def snapshot_problem(s: FramingSnapshot) -> str | None:
    """Why `s` cannot be a framer's snapshot, or None."""
    ints = (s.left, s.digits, s.pending, s.consumed, s.payload)
    if not isinstance(s.kind, Kind) or not isinstance(s.phase, Phase):
        return "unknown kind or phase"
    if min(ints) < 0 or s.max_line < 1:
        return "negative count"
    if s.payload > s.consumed or s.pending > min(s.consumed, s.max_line):
        return "counts out of range"
    if s.kind is not Kind.CHUNKED:
        if s.phase not in (Phase.DATA, Phase.DONE):
            return f"phase {s.phase.value} in a {s.kind.value} body"
        if s.kind is Kind.EOF and s.left:
            return "bytes left in an until-EOF body"
        if s.kind is Kind.LENGTH and (s.left == 0) != (s.phase is Phase.DONE):
            return "bytes left do not match the phase"
    elif s.phase not in _CHUNKED:
        return f"phase {s.phase.value} in a chunked body"
    elif s.phase is Phase.DATA and not s.left:
        return "chunk data with no bytes left"
    elif s.phase not in _SIZE_LINE | {Phase.DATA} and s.left:
        return f"bytes left in phase {s.phase.value}"
    if s.digits > MAX_SIZE_DIGITS or (s.phase is not Phase.SIZE and s.digits):
        return "size digits out of place"
    if s.phase is Phase.SIZE and s.left >= 16 ** s.digits:
        return "chunk size larger than its digits"
    if s.phase in _SIZE_LINE and s.phase is not Phase.SIZE and s.left >= 16 ** MAX_SIZE_DIGITS:
        return "chunk size too large"
    in_trailers = s.kind is Kind.CHUNKED and (s.phase in _TRAILERS or s.phase is Phase.DONE)
    if (s.field or s.trailer_length is not None or s.trailer_te) and not in_trailers:
        return "trailer state outside the trailers"
    if s.phase is Phase.DONE and s.field:
        return "an unfinished trailer field after the end"
    if len(s.field) > s.max_line:
        return "trailer field out of range"
    if s.field and (b":" in s.field) == (s.phase is Phase.NAME):
        return "trailer field does not match the phase"
    if s.phase in (Phase.NAME, Phase.VALUE, Phase.VALUE_LF, Phase.FOLD) and not s.field:
        return "no trailer field in a field phase"
    if s.trailer_length is not None and (
            not _DIGITS.fullmatch(s.trailer_length) or len(s.trailer_length) > MAX_LENGTH_DIGITS):
        return "bad trailer Content-Length"
    return None


def framer_for(request_method: bytes, headers: Sequence[tuple[bytes, bytes]],
               status: int | None = None, *, max_line: int = MAX_LINE) -> BodyFramer:
    """The framer for a message h11 parsed: a request (`status` None) or a final response
    (status >= 200) to a `request_method` request. `headers` as h11 gives them (lower-case
    names, already validated: one `chunked` Transfer-Encoding at most, agreeing Content-Lengths).
    Mirrors h11's `_body_framing` (RFC 9112 6.3)."""
    if status is not None and (status in (204, 304) or request_method == b"HEAD"
                               or (request_method == b"CONNECT" and 200 <= status < 300)):
        return BodyFramer(Kind.LENGTH, 0)
    if _comma_values(headers, b"transfer-encoding"):
        return BodyFramer(Kind.CHUNKED, max_line=max_line)
    lengths = _comma_values(headers, b"content-length")
    if lengths:
        return BodyFramer(Kind.LENGTH, int(lengths[0]))
    return BodyFramer(Kind.LENGTH, 0) if status is None else BodyFramer(Kind.EOF)


def _comma_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """h11's get_comma_header: every comma-separated, stripped, non-empty value of `name`."""
    return [v.strip() for k, value in headers if k == name
            for v in value.lower().split(b",") if v.strip()]
