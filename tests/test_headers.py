"""Pure header rules, table-driven: what crosses the proxy, what is added, what is refused."""

from __future__ import annotations

import pytest

from proxy import headers as hdr

H = list[tuple[bytes, bytes]]


def test_upstream_request_strips_hop_by_hop_and_adds_forwarding() -> None:
    req: H = [(b"host", b"example.com"), (b"connection", b"keep-alive, x-trace"),
              (b"keep-alive", b"timeout=5"), (b"x-trace", b"1"), (b"te", b"trailers"),
              (b"proxy-connection", b"keep-alive"), (b"trailer", b"x"), (b"accept", b"*/*"),
              (b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-proto", b"https"),
              (b"x-forwarded-host", b"evil"), (b"via", b"1.0 edge"), (b"expect", b"100-continue"),
              (b"upgrade", b"websocket")]
    assert hdr.upstream_request(req, "10.0.0.7", hdr.wants_upgrade(req)) == [
        (b"host", b"example.com"), (b"accept", b"*/*"),
        (b"x-forwarded-for", b"1.2.3.4, 10.0.0.7"), (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"example.com"), (b"via", b"1.0 edge, 1.1 proxy")]


def test_upstream_request_keeps_upgrade_for_a_tunnel_and_chunked_framing() -> None:
    req: H = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket"),
              (b"transfer-encoding", b"chunked")]
    out = hdr.upstream_request(req, "::1", hdr.wants_upgrade(req))
    assert (b"upgrade", b"websocket") in out and (b"connection", b"upgrade") in out
    assert (b"transfer-encoding", b"chunked") in out and (b"x-forwarded-for", b"::1") in out


def test_client_response_strips_hop_by_hop_but_keeps_length() -> None:
    resp: H = [(b"content-length", b"5"), (b"connection", b"close, x-internal"),
               (b"x-internal", b"secret"), (b"keep-alive", b"timeout=1"),
               (b"transfer-encoding", b"chunked"), (b"server", b"app")]
    assert hdr.client_response(resp) == [(b"content-length", b"5"), (b"server", b"app"),
                                         (b"via", b"1.1 proxy")]


@pytest.mark.parametrize(("headers", "problem"), [
    ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
     "Content-Length with Transfer-Encoding"),
    ([(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
     "Content-Length with Transfer-Encoding"),
    ([(b"content-length", b"5")], None),
    ([(b"transfer-encoding", b"chunked")], None),
    ([], None),
])
def test_framing_problem(headers: H, problem: str | None) -> None:
    assert hdr.framing_problem(headers) == problem


@pytest.mark.parametrize(("headers", "tunnel"), [
    ([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")], True),
    ([(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"h2c")], True),
    ([(b"upgrade", b"websocket")], False),  # Upgrade not named in Connection: ignore it
    ([(b"connection", b"upgrade")], False),
])
def test_wants_upgrade(headers: H, tunnel: bool) -> None:
    assert hdr.wants_upgrade(headers) is tunnel


def test_idempotent_methods() -> None:
    assert [m for m in (b"GET", b"HEAD", b"PUT", b"DELETE", b"POST", b"PATCH")
            if hdr.idempotent(m)] == [b"GET", b"HEAD", b"PUT", b"DELETE"]
