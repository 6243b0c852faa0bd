"""Guards for the two private h11 paths the proxy's hot path relies on (proxy/http.py): if a
new h11 changes them, these fail rather than the proxy quietly mis-framing."""

from __future__ import annotations

from proxy.h11impl import h11
from proxy.http import _pairs

RAW = (b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nX-Multi: 1\r\nx-multi: 2\r\nContent-Length: 0\r\n\r\n")


def parsed_request() -> h11.Request:
    c = h11.Connection(h11.SERVER)
    c.receive_data(RAW)
    ev = c.next_event()
    assert isinstance(ev, h11.Request)
    return ev


def test_pairs_is_the_lower_cased_header_list() -> None:
    req = parsed_request()
    assert _pairs(req.headers) == list(req.headers) == [
        (b"host", b"a"), (b"x-multi", b"1"), (b"x-multi", b"2"), (b"content-length", b"0")]


def test_parsed_flag_serialises_like_the_validating_path() -> None:
    req = parsed_request()
    headers = [*_pairs(req.headers), (b"via", b"1.1 proxy")]
    out = []
    for parsed in (False, True):
        c = h11.Connection(h11.CLIENT)
        out.append(c.send(h11.Request(method=req.method, target=req.target, headers=headers,
                                      http_version=b"1.1", _parsed=parsed)))
    assert out[0] == out[1]
    assert out[1] is not None and out[1].startswith(b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\n")


def test_parsed_flag_still_checks_framing() -> None:
    bad = [(b"host", b"a"), (b"content-length", b"1"), (b"content-length", b"2")]
    try:
        h11.Request(method=b"POST", target=b"/", headers=bad, _parsed=True)
    except h11.LocalProtocolError:
        return
    raise AssertionError("conflicting Content-Length accepted with _parsed=True")
