"""The baseline: a minimal, careful, hand-written multi-process aio-pika consumer.

    python benchmarks/handwritten.py --queue Q --workers 2 --prefetch 20 \
        --handler benchmarks.handlers:noop [--thread]

The parent imports everything, then forks one multiprocessing.Process per
worker. Each worker runs uvloop, connect_robust, one channel, set_qos(prefetch),
queue.consume(callback); the callback calls the handler (inline, or with
--thread in a one-thread executor so heartbeats keep flowing during CPU work)
and then acks manually.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
import uvloop


async def consume(url: str, queue: str, prefetch: int, handler: Callable[[bytes], Any],
                  threaded: bool) -> None:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    q = await channel.declare_queue(queue, durable=True)
    loop = asyncio.get_running_loop()

    if threaded:
        executor = ThreadPoolExecutor(1)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await loop.run_in_executor(executor, handler, message.body)
            await message.ack()
    else:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            handler(message.body)
            await message.ack()

    await q.consume(on_message)
    await asyncio.Future()  # forever


def worker(url: str, queue: str, prefetch: int, spec: str, threaded: bool) -> None:
    module, _, name = spec.partition(":")
    handler = getattr(importlib.import_module(module), name)
    uvloop.run(consume(url, queue, prefetch, handler, threaded))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=20)
    parser.add_argument("--handler", required=True)
    parser.add_argument("--thread", action="store_true")
    args = parser.parse_args()
    procs = [multiprocessing.Process(target=worker, args=(args.url, args.queue, args.prefetch,
                                                          args.handler, args.thread))
             for _ in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    main()
