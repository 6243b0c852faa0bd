"""Two different releases hand over: the previous release (protocol 1, as it shipped) upgrades
to this one, and this one back to it, with sequence-checked streams running throughout."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pytest
import trio

from tests.e2e.test_tcp import metric
from tests.e2e.test_upgrade import assert_clean, streams_progress, upgrade
from tests.support.load import StreamSet, start_echo, wait_until
from tests.support.proc import ROOT, Proxy

# The last release that spoke only protocol 1 (the takeover before the Session state machine).
PREVIOUS_RELEASE = "6fe734e"


def _export_previous(dest: Proxy) -> None:
    """The previous release's `proxy/` package into the deployment's cwd, where `python -m proxy`
    finds it before this checkout's."""
    try:
        raw = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "proxy"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the previous release is not in this checkout's history: {exc}")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(dest.dir, filter="data")


async def test_previous_release_to_this_one_and_back() -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await start_echo(nursery)
            p = Proxy([f"127.0.0.1:{port}"])
            try:
                _export_previous(p)  # the first generation runs the previous release
                await trio.to_thread.run_sync(p.start)
                ss = StreamSet(p.port, 10).start(nursery)
                await wait_until(streams_progress(ss.streams))
                assert p.count("protocol=") == 0  # it is the old code indeed
                # Up: this release takes over from the previous one (protocol 1).
                shutil.rmtree(p.dir / "proxy")
                await upgrade(p)
                await trio.to_thread.run_sync(lambda: p.wait_log(
                    r"phase=taking_over old_pid=\d+ protocol=1"))
                await wait_until(streams_progress(ss.streams))
                # Down: the previous release takes over from this one, which speaks 1 too.
                _export_previous(p)
                await upgrade(p)
                await wait_until(streams_progress(ss.streams))
                # And up again: the old one handed over everything it got.
                shutil.rmtree(p.dir / "proxy")
                await upgrade(p)
                await wait_until(streams_progress(ss.streams))
                assert metric(p, "proxy_generation") == 4
                assert metric(p, "proxy_upgrades_total", result="success") == 3
                await ss.finish()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(p.stop)
            nursery.cancel_scope.cancel()
    assert_clean(ss.streams)
