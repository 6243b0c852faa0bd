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
HOP_BY_HOP_TUNNEL = HOP_BY_HOP - {b"upgrade"}
# Request headers this proxy sets itself (X-Forwarded-For is extended instead: see
# upstream_request); Expect is answered here (http.py).
REPLACED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"expect"})
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


def _hop_by_hop(headers: HeadersIn, keep_upgrade: bool) -> frozenset[bytes]:
    """The names that must not cross: HOP_BY_HOP and every name Connection lists (Upgrade
    kept for a tunnel)."""
    named = tokens(headers, b"connection")
    if not named:  # the common case: no set arithmetic per message
        return HOP_BY_HOP_TUNNEL if keep_upgrade else HOP_BY_HOP
    return (HOP_BY_HOP | named) - ({b"upgrade"} if keep_upgrade else set())


def upstream_request(headers: HeadersIn, client_ip: str, tunnel: bool,
                     proto: bytes = b"http") -> Headers:
    """The request headers to send upstream (`tunnel`: the request asks for an Upgrade, see
    wants_upgrade; the caller has decided that already).

    One pass over the headers (this runs once per request): Host, Via and Transfer-Encoding
    are read from all of them, X-Forwarded-For only from those that may cross."""
    drop = _hop_by_hop(headers, keep_upgrade=tunnel)
    out: Headers = []
    xff: list[bytes] = []
    via: list[bytes] = []
    host: bytes | None = None
    chunked = False
    for k, v in headers:
        if k == b"host":
            if host is None:
                host = v
        elif k == b"via":
            via.append(v)
            continue
        elif k == b"transfer-encoding":
            chunked = True
        if k in drop:
            continue
        if k == b"x-forwarded-for":
            xff.append(v)
        elif k not in REPLACED:
            out.append((k, v))
    xff.append(client_ip.encode())
    out.append((b"x-forwarded-for", b", ".join(xff)))
    out.append((b"x-forwarded-proto", proto))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))  # h11 re-chunks; only chunked gets here
    if tunnel:
        out.append((b"connection", b"upgrade"))
    return out


def client_response(headers: HeadersIn, tunnel: bool = False) -> Headers:
    """The response headers to send the client (h11 adds framing and connection headers)."""
    drop = _hop_by_hop(headers, keep_upgrade=tunnel)
    out: Headers = []
    via: list[bytes] = []
    for k, v in headers:
        if k == b"via":
            via.append(v)
        elif k not in drop:
            out.append((k, v))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    if tunnel:
        out.append((b"connection", b"upgrade"))
    return out


def idempotent(method: bytes) -> bool:
    return method in IDEMPOTENT
