"""Publishing with publisher confirms: the copy is safe in the broker before we ack.

Used for retry and dead-letter copies. Runs on the worker's loop, on the channel
the worker consumes from: returns raise (mandatory, on_return_raises) and nacks
are reported, neither closes the channel.
"""

from __future__ import annotations

import asyncio

import aio_pika
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.common import FieldTable

from .broker_errors import BROKER_ERRORS


class PublishFailed(Exception):
    """The broker did not confirm the copy; the original must not be acked."""


class Publisher:
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
            channel = await asyncio.wait_for(self._channel.get_underlay_channel(), self._timeout)
            confirm = await channel.basic_publish(
                raw.body, exchange="", routing_key=routing_key, properties=props,
                mandatory=True, timeout=self._timeout)
        except BROKER_ERRORS as exc:
            raise PublishFailed(f"publishing to {routing_key!r} failed: "
                                f"{type(exc).__name__}: {exc}") from None
        if not isinstance(confirm, spec.Basic.Ack):
            raise PublishFailed(f"broker did not confirm the copy to {routing_key!r}: {confirm!r}")
