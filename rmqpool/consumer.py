"""Consuming one queue: per-consumer prefetch, a bounded number of handlers in
flight, batched acks, and the drain sequence.

    broker -> _on_delivery -> inbox -> N executors -> results -> Settler -> copy, ack
                                     (threads for sync handlers,    (settle.py)
                                      tasks for async handlers)

Deliveries are taken from aiormq's channel directly (aio-pika's IncomingMessage
wrapper and its extra task per message cost ~30% of no-op throughput). Sync
handler threads pull from the inbox themselves and run messages back to back; the
loop only wakes once per burst of results, and acks a run of deliveries with one
frame. The robust channel restores QoS, queues and bindings after a reconnect;
then _on_reopen consumes again. A delivery from a channel that has since closed
is never acked: the broker has already requeued it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage

from . import exitcodes
from .broker_errors import BROKER_ERRORS, translated
from .dispatch import Attempt, Dispatcher
from .settle import Settler

log = logging.getLogger("rmqpool.consumer")


class Consumer:
    def __init__(self, channel: aio_pika.abc.AbstractRobustChannel, queue_name: str,
                 dispatcher: Dispatcher, settler: Settler, concurrency: int,
                 on_ready: Callable[[], None], on_lost: Callable[[str], None]):
        self._channel = channel
        self._queue = queue_name
        self._dispatcher = dispatcher
        self._settler = settler
        self._concurrency = concurrency
        self._threaded = not dispatcher.handler.is_async
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._acker = settler.acker
        self._inbox: queue.SimpleQueue[DeliveredMessage | None] | asyncio.Queue[
            DeliveredMessage | None]
        self._inbox = queue.SimpleQueue() if self._threaded else asyncio.Queue()
        self._results: collections.deque[Attempt] = collections.deque()
        self._wake = asyncio.Event()
        self._signalled = False
        self._settle_lock = asyncio.Lock()
        self._executors: list[asyncio.Future[None]] = []
        self._settle_task: asyncio.Task[None] | None = None  # a strong reference
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._draining = False

    async def start(self) -> None:
        """Consume, then start the executors: if consuming fails (the connection went),
        nothing is left running. Deliveries wait in the inbox meanwhile."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        await self._consume()
        self._channel.reopen_callbacks.add(self._on_reopen)
        self._settle_task = asyncio.create_task(self._settle_forever(), name="rmqpool-settler")
        for index in range(self._concurrency):
            if self._threaded:
                exited: asyncio.Future[None] = loop.create_future()
                threading.Thread(target=self._thread_main, args=(index, exited), daemon=True,
                                 name=f"rmqpool-handler-{index}").start()
                self._executors.append(exited)
            else:
                self._executors.append(asyncio.create_task(self._task_main(index)))

    async def _consume(self) -> None:
        raw = await self._channel.get_underlay_channel()
        ok = await raw.basic_consume(self._queue, self._on_delivery)
        self._raw, self._tag = raw, ok.consumer_tag
        raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._on_ready()

    async def _on_reopen(self, _sender: Any) -> None:
        if not self._draining:
            await self._consume()

    def _on_broker_cancel(self, frame: Any) -> None:
        if frame.consumer_tag == self._tag and not self._draining:
            # The queue was deleted (or its leader moved): a fresh worker declares it again.
            self._on_lost(f"the broker cancelled the consumer of {self._queue!r} "
                          "(queue deleted?)")

    async def _on_delivery(self, raw: DeliveredMessage) -> None:
        self._acker.received(raw)
        self._inbox.put_nowait(raw)

    # -- executors ------------------------------------------------------------------
    def _thread_main(self, index: int, exited: asyncio.Future[None]) -> None:
        inbox, run, loop = self._inbox, self._dispatcher.run_sync, self._loop
        assert isinstance(inbox, queue.SimpleQueue)
        raw = None
        try:
            while (raw := inbox.get()) is not None:
                if raw.channel.is_closed:
                    continue
                attempt = run(raw, index, loop)
                if not attempt.failed:
                    self._push(attempt)  # acks are settled in bursts, behind our back
                else:
                    settled = threading.Event()
                    attempt.settled = settled.set
                    self._push(attempt)
                    settled.wait()
        except BaseException:
            self._internal_error(raw, index)
        finally:
            loop.call_soon_threadsafe(_resolve, exited)

    async def _task_main(self, index: int) -> None:
        inbox, run = self._inbox, self._dispatcher.run_async
        assert isinstance(inbox, asyncio.Queue)
        raw = None
        try:
            while (raw := await inbox.get()) is not None:
                if raw.channel.is_closed:
                    continue
                attempt = await run(raw, index)
                if not attempt.failed:
                    self._push(attempt)
                else:
                    settled = asyncio.Event()
                    attempt.settled = settled.set
                    self._push(attempt)
                    await settled.wait()
        except Exception:
            self._internal_error(raw, index)

    def _internal_error(self, raw: DeliveredMessage | None, index: int) -> None:
        """A bug in rmqpool while handling `raw`: exit, with the message shown as running
        so that its redeliveries are charged (the poison rule ends them, no crash loop)."""
        log.critical("internal error handling a message; the worker exits and the broker "
                     "redelivers its messages", exc_info=True)
        if raw is not None:
            try:
                self._dispatcher.mark_failing(raw, index)
            except Exception:
                log.exception("could not mark the message")
        logging.shutdown()
        os._exit(exitcodes.INTERNAL)

    def _push(self, attempt: Attempt) -> None:
        """From a handler thread or the loop: hand a finished attempt to the settler,
        waking the loop once per burst, not once per message."""
        self._results.append(attempt)
        if not self._signalled:
            self._signalled = True
            if self._threaded:
                self._loop.call_soon_threadsafe(self._wake.set)
            else:
                self._wake.set()

    # -- settling ---------------------------------------------------------------------
    async def _settle_forever(self) -> None:
        while True:
            await self._wake.wait()
            await self._settle_pending()

    async def _settle_pending(self) -> None:
        # Clear the flag before taking the batch: a result pushed after this is either
        # in the batch or signals again.
        self._signalled = False
        self._wake.clear()
        batch = []
        while self._results:
            batch.append(self._results.popleft())
        if not batch:
            return
        async with self._settle_lock:
            try:
                await self._settler.settle(batch)
            except Exception:
                self._internal_error(None, 0)

    # -- draining ----------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Stop consuming, return unstarted messages, give in-flight ones `timeout`
        seconds. True when every in-flight handler finished and was settled."""
        deadline = self._loop.time() + timeout
        self._draining = True
        raw, tag = self._raw, self._tag
        if raw is not None and tag is not None and not raw.is_closed:
            try:
                with translated():
                    await asyncio.wait_for(raw.basic_cancel(tag), timeout=min(5.0, timeout))
            except BROKER_ERRORS as exc:
                log.warning("cancelling the consumer failed (%s); closing the connection "
                            "returns unstarted messages instead", exc)
        returned = await self._return_unstarted()
        for _ in self._executors:
            self._inbox.put_nowait(None)  # executors exit after their current message
        log.info("draining: %d unstarted message(s) returned to the queue, waiting up to %gs "
                 "for in-flight handlers", returned, timeout)
        _, running = await asyncio.wait(self._executors, timeout=self._left(deadline))
        if running:
            log.error("graceful timeout (%gs): %d handler(s) still running; their messages "
                      "go back to the queue unacked", timeout, len(running))
            return False
        await self._settle_pending()
        republishing = self._settler.republishing
        if republishing:
            _, unconfirmed = await asyncio.wait(republishing, timeout=self._left(deadline))
            if unconfirmed:
                log.error("graceful timeout (%gs): %d retry/dead-letter copies unconfirmed; "
                          "their originals go back to the queue", timeout, len(unconfirmed))
                return False
        return True

    def _left(self, deadline: float) -> float:
        return max(0.0, deadline - self._loop.time())

    async def _return_unstarted(self) -> int:
        returned = 0
        while True:
            try:
                raw = self._inbox.get_nowait()
            except (queue.Empty, asyncio.QueueEmpty):
                return returned
            if raw is not None and not raw.channel.is_closed:
                await self._acker.nack(raw)
                returned += 1


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

