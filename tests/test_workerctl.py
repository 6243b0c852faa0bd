"""The supervisor-worker control line (sans-IO) and the shared load table."""

from __future__ import annotations

import os

import pytest

from proxy import workerctl as w
from proxy.loads import Loads


@pytest.mark.parametrize("msg", [
    w.Poll(7), w.Serve(), w.Release(), w.Abort("why"), w.Ready(), w.PeerReady(),
    w.Serving(), w.Failed("boom"), w.SuccessorLost(), w.Released({}),
    w.Released({"proxy_bytes_total": [[["web", "upstream_to_client"], 3.0]]}),
    w.Report(3, {"proxy_bytes_total": [[["web", "client_to_upstream"], 12.0]]}, {"web": 2.0},
             {"process_open_fds": 9.0}),
])
def test_every_message_round_trips(msg: w.Message) -> None:
    line = w.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert w.LineDecoder().feed(line) == [msg]


def test_lines_split_anywhere_decode_once() -> None:
    data = w.encode(w.Poll(1)) + w.encode(w.Abort("x y")) + w.encode(w.Ready())
    dec = w.LineDecoder()
    got = [m for i in range(len(data)) for m in dec.feed(data[i:i + 1])]
    assert got == [w.Poll(1), w.Abort("x y"), w.Ready()]


@pytest.mark.parametrize("line", [
    b"nope", b"[]", b'{"type": "launch"}', b'{"type": "poll"}', b'{"type": "poll", "seq": -1}',
    b'{"type": "poll", "seq": true}', b'{"type": "abort"}', b'{"type": "abort", "reason": 5}',
    b'{"type": "report", "seq": 1, "metrics": [], "active": {}, "process": {}}',
    b'{"type": "report", "seq": 1, "metrics": {}, "active": {"web": "1"}, "process": {}}',
    b'{"type": "report", "seq": 1, "metrics": {}, "active": {}, "process": {"x": true}}',
    b"[" * 100000,
])
def test_garbage_is_a_control_error(line: bytes) -> None:
    with pytest.raises(w.ControlError):
        w.LineDecoder().feed(line + b"\n")


def test_a_line_without_end_is_bounded() -> None:
    dec = w.LineDecoder()
    dec.feed(b"x" * w.MAX_LINE)
    with pytest.raises(w.ControlError, match="too long"):
        dec.feed(b"x")


def test_the_load_table_says_who_is_ahead() -> None:
    table, fd = Loads.create(3)
    try:
        mine = Loads(fd, 3, index=0)
        other = Loads(fd, 3, index=1)
    finally:
        os.close(fd)
    other.set(10)  # worker 2 holds 0
    assert not mine.ahead(4)  # within the slack of the least loaded
    assert mine.ahead(5)
    table.clear(1)  # the supervisor clears a slot it respawns
    assert mine.ahead(5) and not mine.ahead(4)
    _, fd1 = Loads.create(1)
    try:
        solo = Loads(fd1, 1, index=0)  # a table of one worker: never ahead
    finally:
        os.close(fd1)
    assert not solo.ahead(1000)
