"""Server selection, pure: round robin, least_conn, passive health with cool-down."""

from __future__ import annotations

from proxy.config import Address, Upstream
from proxy.upstream import Balancer

A, B, C = Address("127.0.0.1", 1), Address("127.0.0.1", 2), Address("127.0.0.1", 3)


def names(bal: Balancer, now: float = 0.0) -> list[int]:
    return [s.addr.port for s in bal.order(now)]


def test_round_robin_rotates_the_first_choice() -> None:
    bal = Balancer(Upstream("u", (A, B, C)))
    assert [names(bal)[0] for _ in range(6)] == [1, 2, 3, 1, 2, 3]
    assert names(bal) == [1, 2, 3]  # every server once, in order after the first


def test_least_conn_prefers_fewest_active() -> None:
    bal = Balancer(Upstream("u", (A, B, C), balance="least_conn"))
    bal.servers[0].active = 5
    bal.servers[1].active = 1
    bal.servers[2].active = 3
    assert names(bal) == [2, 3, 1]


def test_failing_server_cools_down_then_returns() -> None:
    bal = Balancer(Upstream("u", (A, B), max_fails=2, fail_timeout=10.0))
    sa = bal.servers[0]
    assert bal.failed(sa, now=0.0) is False
    assert bal.failed(sa, now=1.0) is True
    for _ in range(4):
        assert names(bal, now=5.0)[0] == 2  # A is tried last while cooling down
    assert sorted(names(bal, now=5.0)) == [1, 2]  # ...but still tried when B fails too
    assert {names(bal, now=11.5)[0] for _ in range(2)} == {1, 2}  # back after fail_timeout


def test_success_resets_the_failure_count() -> None:
    bal = Balancer(Upstream("u", (A,), max_fails=2))
    s = bal.servers[0]
    bal.failed(s, 0.0)
    bal.succeeded(s)
    assert bal.failed(s, 0.0) is False
