"""Publishing from a worker, with publisher confirms: what it sends is safe in the
broker before the message that caused it is acked.

Retry and dead-letter copies, handler output and RPC replies. Runs on the worker's
loop, on the channel the worker consumes from: returns raise (mandatory,
on_return_raises) and nacks are reported, neither closes the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from .broker_errors import BROKER_ERRORS, translated
from .outgoing import Outgoing


class PublishFailed(Exception):
    """The broker did not confirm the copy; the original must not be acked. `refused`:
    the broker said no (a nack, a refusal that closed the channel), as opposed to a lost
    connection, so sending it again will likely be refused again."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _failed(routing_key: str, exc: BaseException) -> PublishFailed:
    """A returned copy is not refused (its queue went missing: declaring the queues again
    fixes that); a nack or a refusal that closed the channel is."""
    returned = isinstance(exc, aiormq.exceptions.PublishError)
    refused = not returned and isinstance(
        exc, aiormq.exceptions.AMQPChannelError | aiormq.exceptions.DeliveryError)
    return PublishFailed(f"publishing to {routing_key!r} failed: {type(exc).__name__}: {exc}",
                         refused=refused)


class ChannelPublisher:
    def __init__(self, channel: aio_pika.abc.AbstractRobustChannel, timeout: float = 30.0):
        self._channel = channel
        self._timeout = timeout

    async def republish(self, raw: DeliveredMessage, routing_key: str,
                        headers: FieldTable) -> None:
        """Publish `raw`'s body, byte-identical, with its properties and new headers. Not
        user_id (the broker refuses one that is not the pool's user) nor expiration (a
        copy must not vanish): copy_headers() keeps both in headers."""
        src = raw.header.properties
        props = spec.Basic.Properties(
            content_type=src.content_type, content_encoding=src.content_encoding,
            headers=headers, delivery_mode=2, priority=src.priority,
            correlation_id=src.correlation_id, reply_to=src.reply_to,
            message_id=src.message_id, timestamp=src.timestamp,
            message_type=src.message_type, app_id=src.app_id)
        try:
            with translated():
                channel = await asyncio.wait_for(self._channel.get_underlay_channel(),
                                                 self._timeout)
                if src.message_id is None:
                    confirm = await _publish_without_id(channel, raw.body, routing_key, props,
                                                        self._timeout)
                else:
                    confirm = await channel.basic_publish(
                        raw.body, exchange="", routing_key=routing_key, properties=props,
                        mandatory=True, timeout=self._timeout)
        except BROKER_ERRORS as exc:
            raise _failed(routing_key, exc) from None
        if not isinstance(confirm, spec.Basic.Ack):
            raise PublishFailed(f"broker did not confirm the copy to {routing_key!r}: {confirm!r}",
                                refused=True)


    async def publish(self, message: Outgoing) -> bool:
        """Publish and wait for the confirm; False when it was returned as unroutable."""
        try:
            channel = await asyncio.wait_for(self._channel.get_underlay_channel(), self._timeout)
            confirm = await channel.basic_publish(
                message.data, exchange=message.exchange, routing_key=message.routing_key,
                properties=message.properties, mandatory=message.mandatory,
                timeout=self._timeout)
        except aiormq.exceptions.PublishError:
            return False
        except BROKER_ERRORS as exc:
            raise _failed(message.routing_key, exc) from None
        if not isinstance(confirm, spec.Basic.Ack):
            raise PublishFailed(f"broker did not confirm the message to "
                                f"{message.routing_key!r}: {confirm!r}", refused=True)
        return True

    async def publish_all(self, messages: list[Outgoing]) -> list[Outgoing]:
        """Publish with the confirms pipelined; returns those returned as unroutable."""
        routed = await asyncio.gather(*map(self.publish, messages))
        return [m for m, ok in zip(messages, routed, strict=True) if not ok]


async def _publish_without_id(channel: aiormq.abc.AbstractChannel, body: bytes,
                              routing_key: str, props: spec.Basic.Properties,
                              timeout: float) -> object:
    """Publish a copy of a message that had no message_id, keeping it without one.

    aiormq's basic_publish gives such a message a random id (it matches returned
    messages to their confirms by id), and a dead letter would then carry an id its
    message never had. So it goes out through send_batch, which keeps it. A return
    could not be matched to its confirm without an id, so the target queue is first
    declared passively, on a channel of its own (a 404 closes its channel): the copy is
    routable when sent."""
    probe = await channel.connection.channel()
    try:
        await probe.queue_declare(routing_key, passive=True)
    finally:
        with contextlib.suppress(*BROKER_ERRORS):
            await probe.close()
    message = Outgoing(body, props, "", routing_key, True)
    async with asyncio.timeout(timeout):
        [confirmation] = await send_batch(channel, [message])
        return await confirmation


async def send_batch(channel: aiormq.abc.AbstractChannel,
                     messages: list[Outgoing]) -> list[asyncio.Future[Any]]:
    """Send `messages` in one write and return their confirmation futures (resolved
    with the broker's Ack or Nack, or failed with aiormq's PublishError when returned).

    What aiormq's basic_publish does one message (one lock, one write, one wake-up of
    its writer) at a time, for many: under the channel's publish lock, each message
    takes the next confirm number and is registered for its confirm (and, if it has an
    id, for a return), then all their frames go out in one write. It uses aiormq's
    public but untyped confirm bookkeeping; keeps a message without an id without one."""
    raw: Any = channel
    size = raw.max_content_size
    frames: list[Any] = []
    futures: list[asyncio.Future[Any]] = []
    async with raw.lock:
        first = raw.delivery_tag
        for message in messages:
            raw.delivery_tag += 1
            tag = raw.delivery_tag
            future = raw.create_future()
            raw.confirmations[tag] = future
            mid = message.properties.message_id
            if mid:
                raw.message_id_delivery_tag[mid] = tag
                future.add_done_callback(_forgetting(raw.message_id_delivery_tag, mid, tag))
            futures.append(future)
            data = message.data
            frames += [spec.Basic.Publish(exchange=message.exchange,
                                          routing_key=message.routing_key,
                                          mandatory=message.mandatory),
                       ContentHeader(properties=message.properties, body_size=len(data))]
            frames += [ContentBody(data[i:i + size]) for i in range(0, len(data), size)]
        try:
            await raw.write_queue.put(ChannelFrame.marshall(channel_number=raw.number,
                                                            frames=frames))
        except BaseException:
            raw.delivery_tag = first  # not sent: give the confirm numbers back
            for tag in range(first + 1, first + 1 + len(messages)):
                raw.confirmations.pop(tag, None)
            for future in futures:
                future.cancel()
            raise
    return futures


def _forgetting(ids: dict[str, int], mid: str, tag: int) -> Any:
    def forget(_future: object) -> None:
        if ids.get(mid) == tag:
            del ids[mid]
    return forget
