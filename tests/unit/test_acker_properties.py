"""Property tests for the Acker: whatever the interleaving of settles, acks, nacks and
channel replacements, the frames a broker receives never ack(multiple=True) over an
unsettled or nacked tag, never name a tag twice, and never go to a replaced channel.

The channel here is a model of a broker's channel (it only records frames and
suspends the sender like aiormq's bounded write queue can); the real broker is
exercised by tests/process/test_hardening.py's ack stress test."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rmqpool.ack import Acker


@dataclass
class ModelChannel:
    """A broker's view of one channel: outstanding tags, and errors it would raise."""

    number: int
    suspensions: list[int]
    outstanding: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    nacked: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    is_closed: bool = False

    async def _suspend(self) -> None:
        for _ in range(self.suspensions.pop() if self.suspensions else 0):
            await asyncio.sleep(0)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = False) -> None:
        await self._suspend()
        if self.is_closed:  # what aiormq does: the broker has requeued everything
            raise ChannelInvalidStateError(f"channel {self.number} closed")
        if tag not in self.outstanding:
            self.errors.append(f"unknown delivery tag {tag}")
        else:
            covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
            self.outstanding -= covered
            self.acked |= covered

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        await self._suspend()
        if self.is_closed:
            raise ChannelInvalidStateError(f"channel {self.number} closed")
        if tag not in self.outstanding:
            self.errors.append(f"unknown delivery tag {tag}")
        else:
            self.outstanding.discard(tag)
            self.nacked.add(tag)


def raw(channel: ModelChannel, tag: int) -> SimpleNamespace:
    return SimpleNamespace(channel=channel, delivery=SimpleNamespace(delivery_tag=tag))


# An operation: ("deliver", n) | ("ack", picks) | ("nack", pick) | ("replace",)
operation = st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 5)),
    st.tuples(st.just("ack"), st.lists(st.integers(0, 30), min_size=1, max_size=6)),
    st.tuples(st.just("nack"), st.integers(0, 30)),
    st.tuples(st.just("replace")),
)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(operation, max_size=40),
       st.lists(st.integers(0, 3), min_size=20, max_size=200))
@example([("deliver", 3), ("nack", 0), ("ack", [0, 1])], [0] * 19 + [3])  # found by review
def test_frames_are_sent_in_decision_order(operations, suspensions):
    asyncio.run(_run(operations, suspensions))


async def _run(operations: list[tuple[Any, ...]], suspensions: list[int]) -> None:
    acker = Acker()
    channels = [ModelChannel(1, suspensions)]
    decided: dict[tuple[int, int], str] = {}  # (channel, tag) -> "ack" | "nack"
    unsettled: list[SimpleNamespace] = []
    next_tag = {1: 1}
    tasks = []
    for op in operations:
        current = channels[-1]
        if op[0] == "deliver":
            for _ in range(op[1]):
                tag = next_tag[current.number]
                next_tag[current.number] += 1
                current.outstanding.add(tag)
                delivery = raw(current, tag)
                acker.received(cast(DeliveredMessage, delivery))
                unsettled.append(delivery)
        elif op[0] == "ack" and unsettled:
            picked = {unsettled[i % len(unsettled)].delivery.delivery_tag: unsettled[i % len(
                unsettled)] for i in op[1]}
            for r in picked.values():
                unsettled.remove(r)
                decided[(r.channel.number, r.delivery.delivery_tag)] = "ack"
            acked = cast(list[DeliveredMessage], list(picked.values()))
            tasks.append(asyncio.create_task(acker.ack(acked)))
        elif op[0] == "nack" and unsettled:
            r = unsettled.pop(op[1] % len(unsettled))
            decided[(r.channel.number, r.delivery.delivery_tag)] = "nack"
            tasks.append(asyncio.create_task(acker.nack(cast(DeliveredMessage, r))))
        elif op[0] == "replace":
            current.is_closed = True  # the broker requeues what it had outstanding
            channels.append(ModelChannel(current.number + 1, suspensions))
            next_tag[current.number + 1] = 1
        await asyncio.sleep(0)  # let some sends start, suspended mid-way
    await asyncio.gather(*tasks)
    for channel in channels:
        assert channel.errors == [], channel.errors
        for tag in channel.acked:
            assert decided.get((channel.number, tag)) == "ack", (channel.number, tag)
        for tag in channel.nacked:
            assert decided.get((channel.number, tag)) == "nack", (channel.number, tag)
