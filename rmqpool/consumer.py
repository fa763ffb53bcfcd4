"""Consuming one queue: per-consumer prefetch, a bounded number of handlers in
flight, and the drain sequence.

Deliveries are taken from aiormq's channel directly (aio-pika's IncomingMessage
wrapper and its extra task per message cost ~30% of no-op throughput) into a
local buffer; `concurrency` runner tasks take from it. The robust channel
restores QoS, exchanges, queues and bindings after a reconnect; then
_on_reopen consumes again. A delivery from a channel that has since closed is
never acked: the broker has already requeued it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage

from . import exitcodes
from .broker_errors import BROKER_ERRORS
from .dispatch import Dispatcher, tag_of

log = logging.getLogger("rmqpool.consumer")


class Consumer:
    def __init__(self, channel: aio_pika.abc.AbstractRobustChannel, queue: str,
                 dispatcher: Dispatcher, concurrency: int, on_ready: Callable[[], None],
                 on_lost: Callable[[str], None]):
        self._channel = channel
        self._queue = queue
        self._dispatcher = dispatcher
        self._concurrency = concurrency
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._buffer: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._runners: list[asyncio.Task[None]] = []
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._draining = False

    async def start(self) -> None:
        self._runners = [asyncio.create_task(self._run(i), name=f"rmqpool-runner-{i}")
                         for i in range(self._concurrency)]
        await self._consume()
        self._channel.reopen_callbacks.add(self._on_reopen)

    async def _consume(self) -> None:
        raw = await self._channel.get_underlay_channel()
        ok = await raw.basic_consume(self._queue, self._ondeliver_framey)
        self._raw, self._tag = raw, ok.consumer_tag
        raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._on_ready()

    def _on_broker_cancel(self, frame: Any) -> None:
        if frame.consumer_tag == self._tag and not self._draining:
            # The queue was deleted (or its leader moved): a fresh worker declares it again.
            self._on_lost(f"the broker cancelled the consumer of {self._queue!r} "
                          "(queue deleted?)")

    async def _on_reopen(self, _sender: Any) -> None:
        if not self._draining:
            await self._consume()

    async def _ondeliver_framey(self, raw: DeliveredMessage) -> None:
        self._buffer.put_nowait(raw)

    async def _run(self, index: int) -> None:
        buffer, dispatch = self._buffer, self._dispatcher.run
        while True:
            raw = await buffer.get()
            if raw is None:
                return
            if raw.channel.is_closed:
                continue
            try:
                await dispatch(raw, index)
            except Exception:  # noqa: BLE001 - a bug: the message would stay unacked forever
                log.critical("internal error handling a message; the worker exits and the "
                             "broker redelivers its messages", exc_info=True)
                logging.shutdown()
                os._exit(exitcodes.INTERNAL)

    async def drain(self, timeout: float) -> bool:
        """Stop consuming, return unstarted messages, give in-flight ones `timeout`
        seconds. True when every in-flight handler finished (and was settled)."""
        self._draining = True
        raw, tag = self._raw, self._tag
        if raw is not None and tag is not None and not raw.is_closed:
            try:
                await asyncio.wait_for(raw.basic_cancel(tag), timeout=min(5.0, timeout))
            except BROKER_ERRORS as exc:
                log.warning("cancelling the consumer failed (%s); closing the connection "
                            "returns unstarted messages instead", exc)
        returned = await self._return_unstarted()
        for _ in self._runners:
            self._buffer.put_nowait(None)  # runners exit after their current message
        in_flight = sum(1 for r in self._runners if not r.done())
        log.info("draining: %d unstarted message(s) returned to the queue, waiting up to %gs "
                 "for in-flight handlers", returned, timeout)
        if not self._runners:
            return True
        _, pending = await asyncio.wait(self._runners, timeout=timeout)
        if pending:
            log.error("graceful timeout (%gs): %d of %d handler(s) still running; their "
                      "messages go back to the queue unacked", timeout, len(pending), in_flight)
            return False
        return True

    async def _return_unstarted(self) -> int:
        returned = 0
        while not self._buffer.empty():
            raw = self._buffer.get_nowait()
            if raw is None or raw.channel.is_closed:
                continue
            try:
                await raw.channel.basic_nack(tag_of(raw), requeue=True)
                returned += 1
            except BROKER_ERRORS:
                pass  # the connection is gone: the broker requeues it anyway
        return returned

    def abort(self) -> None:
        for runner in self._runners:
            runner.cancel()
