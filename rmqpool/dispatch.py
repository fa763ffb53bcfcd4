"""One delivery, start to finish: decode -> call the handler -> decide -> republish -> ack.

Sync handlers run in the worker's handler threads so the event loop keeps the
connection's heartbeats flowing; async handlers run on the loop. Every retry or
dead-letter copy is confirmed by the broker before the original is acked.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.common import FieldTable

from . import topology as t
from .broker_errors import BROKER_ERRORS
from .exceptions import Retry, TimeLimitExceeded, WorkerDied
from .handler import Handler
from .message import Message, attempt_of, decode_body
from .outcome import Action, Outcome, Policy, charge, decide
from .publisher import Publisher, PublishFailed
from .scoreboard import Scoreboard
from .settings import Settings

log = logging.getLogger("rmqpool.dispatch")

TRACEBACK_LIMIT = 4000
EXC_MESSAGE_LIMIT = 1000
# Asks the supervisor how many workers a redelivered message has killed: (deaths, reason).
Ask = Callable[[int], Awaitable[tuple[int, str]]]


def deliver_frame(raw: DeliveredMessage) -> spec.Basic.Deliver:
    """A consumed message's Basic.Deliver frame (aiormq types it as a union with get/return)."""
    return cast(spec.Basic.Deliver, raw.delivery)


def tag_of(raw: DeliveredMessage) -> int:
    return cast(int, raw.delivery.delivery_tag)  # type: ignore[union-attr]


def message_key(raw: DeliveredMessage) -> int:
    """Identity of a message across redeliveries, for poison tracking (never 0)."""
    ident = raw.header.properties.message_id or raw.body
    return (hash(ident) & 0xFFFF_FFFF_FFFF_FFFF) or 1


class Dispatcher:
    def __init__(self, handler: Handler, settings: Settings, slot: int, board: Scoreboard,
                 publisher: Publisher, ask: Ask, declare_tier: Callable[[float], Awaitable[str]]):
        self.handler = handler
        self.settings = settings
        self.slot = slot
        self.board = board
        self.publisher = publisher
        self.ask = ask
        self.declare_tier = declare_tier
        self.policy = Policy(settings.max_retries, settings.retry_delays,
                             settings.max_worker_deaths)
        self.time_limit = settings.time_limit or None
        self.executor = (None if handler.is_async else ThreadPoolExecutor(
            settings.concurrency, thread_name_prefix="rmqpool-handler"))
        self._debug = log.isEnabledFor(logging.DEBUG)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, raw: DeliveredMessage, index: int) -> None:
        """Handle one delivery; settles it (ack, retry or dead-letter) or leaves it for
        redelivery. Only CancelledError escapes."""
        props = raw.header.properties
        attempt = attempt_of(props.headers)
        self.board.start(index, message_key(raw))
        try:
            exc, duration = await self._attempt(raw, props, attempt)
            outcome = decide(exc, attempt, self.policy)
            if outcome.action is not Action.ACK:
                try:
                    await self._republish(raw, outcome, exc, attempt)
                except PublishFailed as failed:
                    log.error("%s; the message goes back to the queue", failed,
                              extra={"event": self._event(raw, "requeued", duration)})
                    await self._settle(raw, requeue=True)
                    return
            if await self._settle(raw, outcome, duration, attempt == 1):
                self._log_outcome(raw, outcome, exc, attempt, duration)
        finally:
            self.board.finish(index)

    async def _attempt(self, raw: DeliveredMessage, props: Any,
                       attempt: int) -> tuple[BaseException | None, float]:
        """Run the handler once: (the exception it raised or None, seconds; -1 if not run)."""
        try:
            if deliver_frame(raw).redelivered:
                failure = charge(*await self.ask(message_key(raw)), self.policy)
                if failure is not None:
                    return failure, -1.0
            body = decode_body(raw.body, props.content_type, props.content_encoding)
        except Exception as exc:  # noqa: BLE001 - malformed body: the outcome decides
            return exc, -1.0
        args = (body, Message(raw, attempt)) if self.handler.wants_message else (body,)
        started = time.monotonic()
        # Sync handlers cannot be interrupted: the supervisor enforces their time limit.
        limit = asyncio.timeout(self.time_limit if self.executor is None else None)
        try:
            if self.executor is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, functools.partial(self.handler.fn, *args))
            else:
                async with limit:
                    await self.handler.fn(*args)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
            # A failing handler is an outcome, not a crash; sys.exit() in a handler too.
            if isinstance(exc, TimeoutError) and limit.expired():
                log.error("handler ran past --time-limit %gs; cancelled", self.time_limit,
                          extra={"event": self._event(raw, "time_limit", self.time_limit or 0)})
                exc = TimeLimitExceeded(f"handler ran past --time-limit {self.time_limit:g}s")
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    async def _settle(self, raw: DeliveredMessage, outcome: Outcome | None = None,
                      duration: float = -1.0, first_attempt: bool = False,
                      requeue: bool = False) -> bool:
        """Count the outcome, then ack (or nack); False when the channel is gone."""
        channel = raw.channel
        if channel.is_closed:
            # The broker has requeued it already: the redelivery will be counted.
            log.info("connection lost before the ack; the broker will redeliver the message",
                     extra={"event": self._event(raw, "redelivered", duration)})
            return False
        if outcome is not None:
            self.board.settle(outcome.action, outcome.reason, duration, first_attempt)
        try:
            if outcome is None:
                await channel.basic_nack(tag_of(raw), requeue=requeue)
            else:
                await channel.basic_ack(tag_of(raw))
        except BROKER_ERRORS:
            return False
        return True

    async def _republish(self, raw: DeliveredMessage, outcome: Outcome,
                         exc: BaseException | None, attempt: int) -> None:
        headers: FieldTable = dict(raw.header.properties.headers or {})
        headers.setdefault(t.H_ROUTING_KEY, deliver_frame(raw).routing_key or "")
        headers.setdefault(t.H_EXCHANGE, deliver_frame(raw).exchange or "")
        if isinstance(exc, WorkerDied):
            headers[t.H_DEATHS] = exc.deaths
        if outcome.action is Action.RETRY:
            headers[t.H_ATTEMPT] = attempt + 1
            delay = outcome.delay
            if not isinstance(exc, Retry):  # a delay the handler asked for is kept exact
                delay = random.choice(t.jittered(delay, self.settings.retry_jitter))
            await self.publisher.republish(raw, await self.declare_tier(delay), headers)
            return
        headers.update({
            t.H_ATTEMPT: attempt,
            t.H_REASON: outcome.reason,
            t.H_QUEUE: self.settings.queue,
            t.H_FAILED_AT: datetime.datetime.now(datetime.UTC).isoformat(),
            t.H_WORKER: self.slot,
        })
        if exc is not None:
            headers[t.H_EXC_TYPE] = type(exc).__qualname__
            headers[t.H_EXC_MESSAGE] = str(exc)[:EXC_MESSAGE_LIMIT]
            tb = "".join(traceback.format_exception(exc))
            headers[t.H_TRACEBACK] = tb[-TRACEBACK_LIMIT:]
        await self.publisher.republish(raw, t.dlq_name(self.settings.queue), headers)

    def _event(self, raw: DeliveredMessage, outcome: str, duration: float) -> dict[str, Any]:
        return {"message_id": raw.header.properties.message_id, "queue": self.settings.queue,
                "outcome": outcome, "duration": round(duration, 6) if duration >= 0 else None}

    def _log_outcome(self, raw: DeliveredMessage, outcome: Outcome, exc: BaseException | None,
                     attempt: int, duration: float) -> None:
        if outcome.action is Action.ACK:
            if self._debug:
                log.debug("acked", extra={"event": self._event(raw, "acked", duration)})
            return
        event = self._event(raw, outcome.action.value, duration)
        event["attempt"] = attempt
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        if outcome.action is Action.RETRY:
            event["delay"] = outcome.delay
            log.warning("attempt %d failed (%s); retrying in %gs", attempt, what, outcome.delay,
                        extra={"event": event})
        else:
            event["reason"] = outcome.reason
            log.error("dead-lettered to %s (%s): %s", t.dlq_name(self.settings.queue),
                      outcome.reason, what, extra={"event": event})
