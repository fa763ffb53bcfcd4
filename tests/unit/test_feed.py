"""The pure parts of `rmqpool publish`: pacing, line splitting, JSON checking and the
window of publishes in flight (with a fake send)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rmqpool import feed
from rmqpool.exceptions import PublishError, PublishRefused


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pace_without_a_rate_never_waits():
    pace = feed.Pace(None)
    assert [pace.delay() for _ in range(1000)] == [0.0] * 1000


def test_pace_spaces_messages_after_a_burst_of_a_tenth_of_a_second():
    clock = Clock()
    pace = feed.Pace(100, clock)
    delays = [pace.delay() for _ in range(12)]  # all asked at t=0
    # The bucket starts full: 10 tokens, then one every 10 ms.
    assert delays == pytest.approx([0.0] * 10 + [0.01, 0.02], abs=1e-9)


def test_pace_keeps_the_average_when_sleeps_overshoot():
    clock = Clock()
    pace = feed.Pace(10, clock)  # burst 1
    sent = []
    for _ in range(50):
        clock.now += pace.delay() + 0.003  # every sleep is 3 ms late
        sent.append(clock.now)
    assert sent[-1] - sent[0] == pytest.approx(49 * 0.1, abs=0.01)  # lateness is caught up


def test_pace_credit_after_a_pause_is_capped_at_the_burst():
    clock = Clock()
    pace = feed.Pace(20, clock)  # burst 2
    pace.delay()
    clock.now = 100.0  # a long pause earns no more than the burst
    assert [pace.delay() for _ in range(4)] == pytest.approx([0, 0, 0.05, 0.1])


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 100])
def test_lines_are_the_same_wherever_the_chunks_are_cut(cut):
    data = b'{"a": 1}\n\n  \r\n"two"\r\n3'
    lines = feed.Lines()
    got = []
    for i in range(0, len(data), cut):
        got += lines.feed(data[i:i + cut])
    got += lines.feed(b"")
    assert got == [(1, b'{"a": 1}'), (4, b'"two"'), (5, b"3")]


@pytest.mark.parametrize("text, problem", [
    ("{", "Expecting property name enclosed in double quotes at column 2"),
    ("[1,\n2,", "at line 2 column 3"),
    ("NaN", "NaN is not JSON"),
    ("-Infinity", "-Infinity is not JSON"),
    (b"\xff", "not UTF-8"),
    ("[" * 100_000, "nested too deeply"),
])
def test_decode_names_the_problem_and_the_fix(text, problem):
    with pytest.raises(feed.BadInput) as caught:
        feed.decode(text, "x line 3", "the fix")
    assert str(caught.value).startswith("x line 3 is not valid JSON (")
    assert problem in str(caught.value) and str(caught.value).endswith("; the fix")


def test_body_raw_is_the_bytes_the_shell_gave():
    assert feed.body('{"a": 1}', raw=False) == {"a": 1}
    assert feed.body("{not json", raw=True) == b"{not json"


async def _items(values: list[Any]) -> AsyncIterator[Any]:
    for value in values:
        yield value


def _window(fail: set[int], size: int = 3) -> tuple[feed.Window, list[int], list[int]]:
    sent: list[int] = []
    peak = [0]
    in_flight = [0]

    async def send(n: int) -> None:
        sent.append(n)
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.001 * (n % 3))  # confirms come back out of order
        in_flight[0] -= 1
        if n in fail:
            raise PublishError(f"failed {n}")

    return feed.Window(send, size, feed.Pace(None)), sent, peak


def test_window_sends_all_with_a_bounded_number_in_flight():
    window, sent, peak = _window(set())
    asyncio.run(window.run(_items(list(range(20)))))
    assert sorted(sent) == list(range(20)) and window.confirmed == 20
    assert peak[0] == 3


def test_window_stops_at_the_first_failure_and_counts_exactly():
    window, sent, _ = _window({5, 6})
    with pytest.raises(PublishError, match="failed 5"):
        asyncio.run(window.run(_items(list(range(100)))))
    assert len(sent) < 12  # stopped sending soon after the failure
    assert window.confirmed == len(sent) - 2  # everything sent settled, 2 failed


def test_window_lets_what_was_sent_settle_before_a_bad_input_comes_out():
    async def bad_after_four() -> AsyncIterator[Any]:
        for n in range(4):
            yield n
        raise feed.BadInput("line 5 is bad")

    window, sent, _ = _window(set())
    with pytest.raises(feed.BadInput):
        asyncio.run(window.run(bad_after_four()))
    assert sent == [0, 1, 2, 3] and window.confirmed == 4


def test_a_refusal_cancels_the_others_in_flight():
    """Every message goes to the same place: once the broker refused one (no such
    exchange), the others would wait for the channel to come back only to be refused."""
    async def send(n: int) -> None:
        if n < 2:
            return
        if n == 4:
            await asyncio.sleep(0.01)
            raise PublishRefused("exchange 'x' does not exist")
        await asyncio.Event().wait()  # a retry that would never end well

    window = feed.Window(send, 10, feed.Pace(None))

    async def run() -> None:
        await asyncio.wait_for(window.run(_items(list(range(100)))), 5)

    with pytest.raises(PublishRefused):
        asyncio.run(run())
    assert window.confirmed == 2
