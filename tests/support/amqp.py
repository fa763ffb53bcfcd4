"""Synchronous helpers for tests: publish, count, fetch and delete, against a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika

URL = os.environ.get("RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")


# Every queue a test session creates starts with this, so the session can delete
# whatever a test left behind (retry tiers it did not know about, say).
SESSION_PREFIX = f"rmqpool-test-{uuid.uuid4().hex[:6]}-"


def unique(prefix: str = "t") -> str:
    return f"{SESSION_PREFIX}{prefix}-{uuid.uuid4().hex[:8]}"


def leftover_queues(prefix: str = SESSION_PREFIX) -> list[str] | None:
    """Queues on the local broker whose names start with `prefix` (via rabbitmqctl;
    None when it is not available)."""
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [name for name in out.stdout.split() if name.startswith(prefix)]


def publish(queue: str, bodies: Iterable[Any], url: str = URL, *,
            content_type: str = "application/json", ids: Iterable[str] | None = None,
            exchange: str = "", routing_key: str | None = None,
            headers: dict[str, Any] | None = None) -> list[str]:
    """Publish persistent messages with confirms; returns their message ids."""
    bodies = list(bodies)
    ids = list(ids) if ids is not None else [uuid.uuid4().hex for _ in bodies]

    async def go() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            target = (await channel.get_exchange(exchange) if exchange
                      else channel.default_exchange)
            pending = []
            for body, mid in zip(bodies, ids, strict=True):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                pending.append(target.publish(
                    aio_pika.Message(raw, content_type=content_type, message_id=mid,
                                     headers=headers,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=routing_key if routing_key is not None else queue))
                if len(pending) >= 200:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)

    asyncio.run(go())
    return ids


def publish_messages(queue: str, messages: Iterable[aio_pika.Message], url: str = URL) -> None:
    """Publish ready-made messages (each with its own properties and headers) to `queue`
    through the default exchange, with confirms."""
    messages = list(messages)

    async def go() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for start in range(0, len(messages), 200):
                await asyncio.gather(*(channel.default_exchange.publish(m, routing_key=queue)
                                       for m in messages[start:start + 200]))

    asyncio.run(go())


def declare(queue: str, url: str = URL, arguments: dict[str, Any] | None = None) -> None:
    async def go() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True, arguments=arguments)

    asyncio.run(go())


def _declare_ok(queue: str, url: str) -> Any:
    """The broker's Queue.DeclareOk for a passive declare of `queue`, or None if it does
    not exist."""
    async def go() -> Any:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            try:
                q = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return None
            return q.declaration_result

    return asyncio.run(go())


def count(queue: str, url: str = URL) -> int | None:
    """Ready messages in `queue`, or None if it does not exist."""
    ok = _declare_ok(queue, url)
    return None if ok is None else int(ok.message_count)


def consumers(queue: str, url: str = URL) -> int | None:
    """Consumers of `queue`, or None if it does not exist."""
    ok = _declare_ok(queue, url)
    return None if ok is None else int(ok.consumer_count)


def counts(queues: Iterable[str], url: str = URL) -> dict[str, int | None]:
    """Ready messages in each queue (None for one that does not exist), on one connection."""
    async def go() -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        connection = await aio_pika.connect(url)
        async with connection:
            for name in queues:
                # A channel each: a passive declare of a missing queue closes its channel.
                channel = await connection.channel()
                try:
                    q = await channel.declare_queue(name, passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    out[name] = None
                    continue
                out[name] = q.declaration_result.message_count
                await channel.close()
        return out

    return asyncio.run(go())


def get_all(queue: str, url: str = URL) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every ready message from `queue` (acked)."""
    async def go() -> list[aio_pika.abc.AbstractIncomingMessage]:
        out = []
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, passive=True)
            while (msg := await q.get(fail=False)) is not None:
                await msg.ack()
                out.append(msg)
        return out

    return asyncio.run(go())


def delete(queues: Iterable[str], url: str = URL, exchanges: Iterable[str] = ()) -> None:
    async def go() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            for name in queues:
                channel = await connection.channel()
                await channel.queue_delete(name)
            for name in exchanges:
                channel = await connection.channel()
                await channel.exchange_delete(name)

    asyncio.run(go())


def pool_queues(queue: str, delays: Iterable[float] = (1.0, 10.0, 60.0)) -> list[str]:
    """The queues rmqpool declares for `queue`."""
    from rmqpool import topology

    return [queue, topology.dlq_name(queue),
            *(topology.retry_queue_name(queue, d) for d in delays)]
