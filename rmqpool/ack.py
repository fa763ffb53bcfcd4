"""Acking the deliveries of the current channel, frames in the order they were decided.

AckBook is the pure part: which delivery tags are still unsettled, and which frames
settle a batch. Acker sends those frames. Deciding and sending happen under one
FIFO lock, so a frame never overtakes one decided before it: an
ack(multiple=True) judged contiguous cannot reach the broker before the nack of a
tag it would otherwise cover, and no tag is acked twice (a 406 "unknown delivery
tag" would close the channel and rerun everything in flight).
"""

from __future__ import annotations

import asyncio
from typing import cast

from aiormq.abc import AbstractChannel, DeliveredMessage

from .broker_errors import BROKER_ERRORS, translated

Frame = tuple[int, bool]  # (delivery tag, multiple)


def tag_of(raw: DeliveredMessage) -> int:
    return cast(int, raw.delivery.delivery_tag)  # type: ignore[union-attr]


class AckBook:
    """The unsettled delivery tags of the current channel, in delivery order."""

    def __init__(self) -> None:
        self.channel: object | None = None
        self._outstanding: dict[int, None] = {}

    def received(self, channel: object, tag: int) -> None:
        if channel is not self.channel:  # a new channel numbers its deliveries from 1
            self.channel, self._outstanding = channel, {}
        self._outstanding[tag] = None

    def ack(self, channel: object, tags: list[int]) -> list[Frame]:
        """The frames that ack `tags`: one ack(multiple=True) when they are exactly the
        oldest unsettled deliveries, else one frame each (multiple must never cover a
        message still being handled). Tags of another channel, or settled already, are
        left out: the broker has requeued or settled them."""
        if channel is not self.channel:
            return []
        tags = sorted({tag for tag in tags if tag in self._outstanding})
        if not tags:
            return []
        oldest = iter(self._outstanding)
        contiguous = all(next(oldest) == tag for tag in tags)
        for tag in tags:
            del self._outstanding[tag]
        if contiguous:
            return [(tags[-1], len(tags) > 1)]
        return [(tag, False) for tag in tags]

    def nack(self, channel: object, tag: int) -> bool:
        """Whether `tag` is unsettled on the current channel (and now is not)."""
        if channel is not self.channel or tag not in self._outstanding:
            return False
        del self._outstanding[tag]
        return True


class Acker:
    def __init__(self) -> None:
        self.book = AckBook()
        self._lock = asyncio.Lock()

    def received(self, raw: DeliveredMessage) -> None:
        self.book.received(raw.channel, tag_of(raw))

    async def ack(self, raws: list[DeliveredMessage], wait: bool = False) -> None:
        """wait=True: return once the frame is written to the socket (before a worker
        might die running the next message)."""
        async with self._lock:
            channel = cast(AbstractChannel | None, self.book.channel)
            frames = self.book.ack(channel, [tag_of(raw) for raw in raws if raw.channel is channel])
            try:
                with translated():
                    for tag, multiple in frames:
                        assert channel is not None
                        await channel.basic_ack(tag, multiple=multiple, wait=wait)
            except BROKER_ERRORS:
                pass  # the channel closed under us: the broker requeues, the redelivery counts

    async def nack(self, raw: DeliveredMessage) -> None:
        """Return a delivery to the queue."""
        async with self._lock:
            if self.book.nack(raw.channel, tag_of(raw)):
                try:
                    with translated():
                        await raw.channel.basic_nack(tag_of(raw), requeue=True)
                except BROKER_ERRORS:
                    pass
