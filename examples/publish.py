"""Publish sample JSON messages:  python examples/publish.py --queue demo --count 10

Persistent messages with publisher confirms, to the default exchange.
"""

import argparse
import asyncio
import json
import os
import uuid

import aio_pika


async def publish(url: str, queue: str, count: int, fail_every: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        # Publisher confirms are on by default; an unroutable message raises instead of
        # vanishing. Declare the queue as rmqpool does (durable, classic) so messages
        # published before the pool first starts are kept.
        channel = await connection.channel(on_return_raises=True)
        await channel.declare_queue(queue, durable=True)
        for i in range(count):
            body = {"n": i}
            if fail_every and i % fail_every == 0:
                body["fail"] = f"sample failure {i}"
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 message_id=uuid.uuid4().hex,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue)
    print(f"published {count} message(s) to {queue!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get(
        "RMQPOOL_URL", os.environ.get("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/")))
    parser.add_argument("--queue", default=os.environ.get("RMQPOOL_QUEUE", "rmqpool"))
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--fail-every", type=int, default=0,
                        help="every Nth message asks the example handler to fail")
    args = parser.parse_args()
    asyncio.run(publish(args.url, args.queue, args.count, args.fail_every))


if __name__ == "__main__":
    main()
