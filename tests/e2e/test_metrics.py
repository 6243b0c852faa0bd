"""/metrics end to end: real traffic moves counters; nothing goes down across upgrades; the
endpoint keeps answering while generations change."""

from __future__ import annotations

import http.client
import itertools

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_upgrade import deployment, streams_progress, upgrade
from tests.support.load import SeqStream, ShortConns, wait_until
from tests.support.proc import Proxy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(p: Proxy, method: str = "GET", path: str = "/metrics") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", p.metrics_port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def parse(body: bytes) -> tuple[Samples, dict[str, str]]:
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            types[s.name] = fam.type
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def monotonic_part(samples: Samples, types: dict[str, str]) -> Samples:
    """Counter and histogram samples of our own (process_* describe one process)."""
    return {k: v for k, v in samples.items()
            if types[k[0]] in ("counter", "histogram") and k[0].startswith("proxy_")}


def test_endpoint_get_head_404() -> None:
    from tests.support.backends import Backend, echo
    from tests.support.proc import running

    with Backend(echo) as be, running([be.addr]) as p:
        status, body = scrape(p)
        assert status == 200 and b"proxy_generation 1.0" in body
        status, body = scrape(p, "HEAD")
        assert status == 200 and body == b""
        assert scrape(p, path="/nope")[0] == 404
        assert scrape(p, "POST")[0] == 405


async def test_counters_never_go_down_and_endpoint_answers_through_upgrades() -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, deployment(nursery) as p:
            stop = trio.Event()
            streams = [SeqStream(p.port, i) for i in range(8)]
            shorts = ShortConns(p.port)
            for s in streams:
                nursery.start_soon(s.run, stop)
            nursery.start_soon(shorts.run, stop)
            scrapes: list[Samples] = []
            scrape_errors: list[str] = []
            scraper_done = trio.Event()

            async def scraper() -> None:
                try:
                    await scrape_loop()
                finally:
                    scraper_done.set()

            async def scrape_loop() -> None:
                while not stop.is_set():
                    try:
                        status, body = await trio.to_thread.run_sync(scrape, p)
                        assert status == 200
                        samples, types = parse(body)
                        scrapes.append(monotonic_part(samples, types))
                    except (OSError, AssertionError, http.client.HTTPException) as exc:
                        scrape_errors.append(repr(exc))
                    await trio.sleep(0.01)

            nursery.start_soon(scraper)
            await wait_until(streams_progress(streams))
            gens = []
            for _ in range(5):
                await upgrade(p)
                await wait_until(streams_progress(streams))
                samples, _ = parse(scrape(p)[1])
                gens.append(samples[("proxy_generation", ())])
            p.arm_fault("new:before_ready:crash")
            await trio.to_thread.run_sync(p.signal_upgrade_expect_failure)
            p.disarm_fault()
            await wait_until(lambda: len(scrapes) > 3)
            final, _ = parse(scrape(p)[1])
            stop.set()
            await scraper_done.wait()  # its last scrape must not race the proxy's shutdown
            nursery.cancel_scope.cancel()
    assert not scrape_errors, scrape_errors[:5]
    assert len(scrapes) > 20
    for before, after in itertools.pairwise(scrapes):
        for key, value in before.items():
            assert after.get(key, 0.0) >= value, (key, value, after.get(key))
    assert gens == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert final[("proxy_upgrades_total", (("result", "success"),))] == 5
    assert final[("proxy_upgrades_total", (("result", "failed"),))] == 1
    assert final[("proxy_upgrade_duration_seconds_count", ())] == 5
    assert final[("proxy_handover_connections_total", (("mode", "tcp"),))] >= 8 * 5
    assert final[("proxy_connections_accepted_total", (("listener", "web"),))] >= shorts.ok
    assert final[("proxy_lifecycle_phase", (("phase", "serving"),))] == 1
    assert not shorts.failures


def test_idle_scraper_connection_does_not_hold_the_old_generation() -> None:
    """Prometheus keeps its connection alive between scrapes; an old generation must not wait
    for it (only for a scrape being answered). The bound below is under the endpoint's 10 s
    per-request timeout, which is what held the old generation before."""
    from tests.support.backends import Backend, echo
    from tests.support.proc import alive, running

    with Backend(echo) as be, running([be.addr]) as p:
        conn = http.client.HTTPConnection("127.0.0.1", p.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        assert conn.getresponse().read().startswith(b"# HELP")
        old = p.pid()
        p.upgrade(timeout=5.0)
        assert not alive(old)
        conn.request("GET", "/metrics")  # the idle connection died with the old generation...
        try:
            conn.getresponse().read()
            raise AssertionError("the old generation's idle scrape connection still answered")
        except (http.client.HTTPException, ConnectionError):
            pass
        conn.close()
        status, body = scrape(p)  # ...and the next scrape reaches the new one
        assert status == 200 and b"proxy_generation 2.0" in body
