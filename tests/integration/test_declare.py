"""The fallback of a refused start: deleting the queues it created, against the real
broker. Only empty, unused queues go: a message published into one meanwhile, or a
consumer that found it, keeps it."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from rmqpool.declare import delete_created
from tests.support import amqp


@pytest.mark.timeout(30)
def test_only_empty_unused_queues_are_deleted():
    empty, full, used, gone = (amqp.unique(kind) for kind in ("empty", "full", "used", "gone"))
    for name in (empty, full, used):
        amqp.declare(name)
    amqp.publish(full, [{"n": 1}])

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass  # never called: `used` stays empty

    async def go() -> None:
        connection = await aio_pika.connect(amqp.URL)
        async with connection:
            channel = await connection.channel()
            consumer = await (await channel.get_queue(used)).consume(ignore)
            assert connection.transport is not None
            await delete_created(connection.transport.connection, [empty, full, used, gone])
            await (await channel.get_queue(used)).cancel(consumer)

    try:
        asyncio.run(go())
        assert amqp.count(empty) is None
        assert amqp.count(full) == 1 and amqp.count(used) == 0
    finally:
        amqp.delete([empty, full, used])
