"""Pure HTTP/1.1 header rules for the proxy: no I/O, no h11 state; bytes in, bytes out.

Headers are lists of (name, value) byte pairs as h11 gives them (names lower-cased). h11 frames
and re-serialises every message, so the rules here only decide *which* headers cross the proxy:

- hop-by-hop headers never cross (RFC 9110 7.6.1): Connection and every header it names,
  Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding (h11 re-frames the body), and
  Upgrade unless the request is being tunnelled;
- the request gains X-Forwarded-For (client address appended), X-Forwarded-Proto and
  X-Forwarded-Host (set from what this proxy saw: a client cannot spoof them past us) and Via;
- a request whose framing is ambiguous is refused before anything reaches a backend.
"""

from __future__ import annotations

from collections.abc import Sequence

Headers = list[tuple[bytes, bytes]]
HeadersIn = Sequence[tuple[bytes, bytes]]  # what h11 hands us

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
VIA = b"1.1 proxy"


def get(headers: HeadersIn, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def tokens(headers: HeadersIn, name: bytes) -> set[bytes]:
    """Comma-separated tokens of every `name` header, lower-cased and stripped."""
    out: set[bytes] = set()
    for k, v in headers:
        if k == name:
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def framing_problem(headers: HeadersIn) -> str | None:
    """Why a request's body framing is ambiguous (refuse it with 400), or None.

    h11 already rejects differing duplicate Content-Length values and any transfer coding but
    chunked; it accepts Content-Length together with Transfer-Encoding (RFC 9112 6.3 lets a
    server reject that), which is the classic request-smuggling shape, so we refuse it."""
    has_cl = any(k == b"content-length" for k, _ in headers)
    has_te = any(k == b"transfer-encoding" for k, _ in headers)
    if has_cl and has_te:
        return "Content-Length with Transfer-Encoding"
    return None


def wants_upgrade(headers: HeadersIn) -> bool:
    return b"upgrade" in tokens(headers, b"connection") and get(headers, b"upgrade") is not None


def _strip_hop_by_hop(headers: HeadersIn, keep_upgrade: bool) -> Headers:
    named = tokens(headers, b"connection")
    drop = (HOP_BY_HOP | named) - ({b"upgrade"} if keep_upgrade else set())
    return [(k, v) for k, v in headers if k not in drop]


def upstream_request(headers: HeadersIn, client_ip: str, tunnel: bool,
                     proto: bytes = b"http") -> Headers:
    """The request headers to send upstream (`tunnel`: the request asks for an Upgrade, see
    wants_upgrade; the caller has decided that already)."""
    out = _strip_hop_by_hop(headers, keep_upgrade=tunnel)
    out = [(k, v) for k, v in out if k not in (b"x-forwarded-proto", b"x-forwarded-host",
                                                   b"expect", b"via")]
    xff = [v for k, v in out if k == b"x-forwarded-for"]
    out = [(k, v) for k, v in out if k != b"x-forwarded-for"]
    out.append((b"x-forwarded-for", b", ".join([*xff, client_ip.encode()])))
    out.append((b"x-forwarded-proto", proto))
    host = get(headers, b"host")
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"via", _via(headers)))
    if get(headers, b"transfer-encoding") is not None:
        out.append((b"transfer-encoding", b"chunked"))  # h11 re-chunks; only chunked gets here
    if tunnel:
        out.append((b"connection", b"upgrade"))
    return out


def client_response(headers: HeadersIn, tunnel: bool = False) -> Headers:
    """The response headers to send the client (h11 adds framing and connection headers)."""
    out = [(k, v) for k, v in _strip_hop_by_hop(headers, keep_upgrade=tunnel) if k != b"via"]
    out.append((b"via", _via(headers)))
    if tunnel:
        out.append((b"connection", b"upgrade"))
    return out


def _via(headers: HeadersIn) -> bytes:
    prior = [v for k, v in headers if k == b"via"]
    return b", ".join([*prior, VIA])


def idempotent(method: bytes) -> bool:
    return method in IDEMPOTENT
