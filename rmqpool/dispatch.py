"""One delivery, start to finish: decode -> call the handler -> decide -> republish -> ack.

Sync handlers run in the worker's handler threads (run_sync) so the event loop
keeps the connection's heartbeats flowing; async handlers run on the loop
(run_async). Settling happens on the loop, in batches. Every retry or
dead-letter copy is confirmed by the broker before the original is acked; a
message's counters are written just before its ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.common import FieldTable

from . import topology as t
from .broker_errors import BROKER_ERRORS
from .control import Verdict
from .exceptions import MalformedMessage, Retry, TimeLimitExceeded, WorkerDied
from .handler import Handler
from .message import Message, attempt_of, decode_body
from .outcome import Action, Outcome, Policy, charge, decide
from .publisher import Publisher, PublishFailed
from .scoreboard import Scoreboard
from .settings import Settings

if TYPE_CHECKING:
    from .consumer import Acker

log = logging.getLogger("rmqpool.dispatch")

TRACEBACK_LIMIT = 4000
EXC_MESSAGE_LIMIT = 1000
# Asks the supervisor what it knows of a redelivered message (message key, settled key).
Ask = Callable[[int, int], Coroutine[Any, Any, Verdict]]


class AlreadySettled(Exception):
    """A redelivery of a message a dead worker had settled: ack it, nothing else."""


def deliver_frame(raw: DeliveredMessage) -> spec.Basic.Deliver:
    """A consumed message's Basic.Deliver frame (aiormq types it as a union with get/return)."""
    return cast(spec.Basic.Deliver, raw.delivery)


def tag_of(raw: DeliveredMessage) -> int:
    return cast(int, raw.delivery.delivery_tag)  # type: ignore[union-attr]


def keys(raw: DeliveredMessage, attempt: int) -> tuple[int, int]:
    """(message key, settled key) of one attempt of a message, for the supervisor.

    The message key identifies it across redeliveries for poison tracking (never 0); per
    attempt, so a time-limit kill is charged to the attempt it killed and the retry copy
    starts clean. The settled key recognises the redelivery of an attempt that was settled
    but whose ack was lost; only for messages with an id (0 otherwise): two messages with
    the same body and no id cannot be told apart, and must never be skipped."""
    mid = raw.header.properties.message_id
    key = (hash((mid or raw.body, attempt)) & 0xFFFF_FFFF_FFFF_FFFF) or 1
    return key, key if mid else 0


class _GateState:
    """Handlers run side by side, but a suspect message (one that was running when a
    worker died beside others) runs alone, so that if it kills this worker too, the death
    is charged to it and not to its neighbours. Waiting suspects go first."""

    def __init__(self) -> None:
        self._running = 0
        self._alone = False
        self._waiting_alone = 0

    def _may_enter(self, alone: bool) -> bool:
        if alone:
            return not self._running
        return not (self._alone or self._waiting_alone)

    def _enter(self, alone: bool) -> None:
        self._running += 1
        self._alone = alone

    def _leave(self) -> None:
        self._running -= 1
        self._alone = False


class Gate(_GateState):
    """For sync handlers, in their threads (with --concurrency > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def enter(self, alone: bool) -> Iterator[None]:
        with self._cond:
            self._waiting_alone += alone
            self._cond.wait_for(lambda: self._may_enter(alone))
            self._waiting_alone -= alone
            self._enter(alone)
        try:
            yield
        finally:
            with self._cond:
                self._leave()
                self._cond.notify_all()


class AsyncGate(_GateState):
    """For async handlers, on the loop (with --concurrency > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_alone += alone
            await self._cond.wait_for(lambda: self._may_enter(alone))
            self._waiting_alone -= alone
            self._enter(alone)
        try:
            yield
        finally:
            async with self._cond:
                self._leave()
                self._cond.notify_all()


@dataclass(slots=True)
class Attempt:
    """One run of the handler on one delivery."""

    raw: DeliveredMessage
    number: int  # the attempt number, 1-based
    exc: BaseException | None  # what the handler raised (or why it did not run)
    duration: float  # seconds in the handler; -1 when it did not run
    settled_key: int  # see keys()
    # Called once a failed attempt is settled: its executor waits for that before the
    # next message, so a worker that dies soon after never leaves two copies in flight.
    settled: Callable[[], None] | None = None

    @property
    def failed(self) -> bool:
        """Its outcome is a retry or dead-letter copy (published before the ack)."""
        return self.exc is not None and not isinstance(self.exc, AlreadySettled)


class Dispatcher:
    """Runs the handler on a delivery (run_sync in a handler thread, run_async on the loop)
    and settles batches of attempts on the loop (settle)."""

    def __init__(self, handler: Handler, settings: Settings, slot: int, board: Scoreboard,
                 publisher: Publisher, ask: Ask, declare_tier: Callable[[float], Awaitable[str]],
                 redeclare: Callable[[], Awaitable[None]]):
        self.handler = handler
        self.settings = settings
        self.slot = slot
        self.board = board
        self.publisher = publisher
        self.ask = ask
        self.declare_tier = declare_tier
        self.redeclare = redeclare
        self.policy = Policy(settings.max_retries, settings.retry_delays,
                             settings.max_worker_deaths)
        self.time_limit = settings.time_limit or None
        self.republishing: set[asyncio.Task[None]] = set()
        several = settings.concurrency > 1
        self.gate = Gate() if several and not handler.is_async else None
        self.async_gate = AsyncGate() if several and handler.is_async else None
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- running --------------------------------------------------------------------
    def run_sync(self, raw: DeliveredMessage, index: int,
                 loop: asyncio.AbstractEventLoop) -> Attempt:
        """In a handler thread. The supervisor enforces --time-limit: threads can't be
        interrupted, so it kills the worker."""
        attempt = attempt_of(raw.header.properties.headers)
        key, skey = keys(raw, attempt)
        failure: BaseException | None = None
        alone = False
        if deliver_frame(raw).redelivered:
            failure, alone = self._judge(asyncio.run_coroutine_threadsafe(
                self.ask(key, skey), loop).result())
        args = self._args(raw, attempt) if failure is None else failure
        if isinstance(args, BaseException):
            return Attempt(raw, attempt, args, -1.0, skey)
        with self.gate.enter(alone) if self.gate else contextlib.nullcontext():
            self.board.start(index, key, raw.header.properties.message_id)
            started = time.monotonic()
            try:
                self.handler.fn(*args)
            except BaseException as exc:  # noqa: BLE001
                # A failing handler is an outcome, not a crash: sys.exit(), a
                # CancelledError escaping an asyncio.run() inside it, anything.
                return Attempt(raw, attempt, exc, time.monotonic() - started, skey)
            finally:
                self.board.finish(index)
            return Attempt(raw, attempt, None, time.monotonic() - started, skey)

    async def run_async(self, raw: DeliveredMessage, index: int) -> Attempt:
        """On the loop; cancelled at --time-limit."""
        attempt = attempt_of(raw.header.properties.headers)
        key, skey = keys(raw, attempt)
        alone = False
        if deliver_frame(raw).redelivered:
            failure, alone = self._judge(await self.ask(key, skey))
            if failure is not None:
                return Attempt(raw, attempt, failure, -1.0, skey)
        args = self._args(raw, attempt)
        if isinstance(args, BaseException):
            return Attempt(raw, attempt, args, -1.0, skey)
        async with self.async_gate.enter(alone) if self.async_gate else contextlib.nullcontext():
            self.board.start(index, key, raw.header.properties.message_id)
            started = time.monotonic()
            limit = asyncio.timeout(self.time_limit)
            try:
                async with limit:
                    await self.handler.fn(*args)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                    raise  # the worker itself is stopping: not the handler's outcome
                if isinstance(exc, TimeoutError) and limit.expired():
                    log.error("handler ran past --time-limit %gs; cancelled", self.time_limit,
                              extra={"event": self._event(raw, "time_limit", -1.0)})
                    exc = TimeLimitExceeded(f"handler ran past --time-limit {self.time_limit:g}s")
                return Attempt(raw, attempt, exc, time.monotonic() - started, skey)
            finally:
                self.board.finish(index)
            return Attempt(raw, attempt, None, time.monotonic() - started, skey)

    def _judge(self, verdict: Verdict) -> tuple[BaseException | None, bool]:
        """A redelivered message: (why not to run it, or None; whether to run it alone)."""
        if verdict.settled:
            return AlreadySettled(), False
        return (charge(verdict.deaths, verdict.reason, self.policy),
                bool(verdict.deaths or verdict.suspect))

    def _args(self, raw: DeliveredMessage, attempt: int) -> tuple[Any, ...] | MalformedMessage:
        props = raw.header.properties
        try:
            body = decode_body(raw.body, props.content_type, props.content_encoding)
        except MalformedMessage as exc:
            return exc
        return (body, Message(raw, attempt)) if self.handler.wants_message else (body,)

    # -- settling (on the loop) ---------------------------------------------------------
    async def settle(self, batch: list[Attempt], acker: Acker) -> None:
        """Acks are counted and sent together (one frame for a run of deliveries); a retry
        or dead-letter copy is published, confirmed, and only then its original acked."""
        acks = []
        for attempt in batch:
            if isinstance(attempt.exc, AlreadySettled):
                log.info("redelivered, but a worker that died had settled it (its ack was "
                         "lost): acked without running or counting it again",
                         extra={"event": self._event(attempt.raw, "acked", -1.0)})
                acks.append(attempt.raw)
                continue
            outcome = decide(attempt.exc, attempt.number, self.policy)
            if outcome.action is Action.ACK:
                if attempt.raw.channel.is_closed:
                    self._lost(attempt)
                    continue
                self.board.settle(Action.ACK, "", attempt.duration, attempt.number == 1,
                                  attempt.settled_key)
                acks.append(attempt.raw)
                if self._debug:
                    log.debug("acked", extra={"event": self._event(
                        attempt.raw, "acked", attempt.duration)})
            else:
                task = asyncio.create_task(self._settle_failure(attempt, outcome, acker))
                self.republishing.add(task)
                task.add_done_callback(self.republishing.discard)
                if attempt.settled is not None:
                    task.add_done_callback(_call(attempt.settled))
        if acks:
            await acker.ack(acks)

    async def _settle_failure(self, attempt: Attempt, outcome: Outcome, acker: Acker) -> None:
        raw = attempt.raw
        try:
            await self._republish(raw, outcome, attempt.exc, attempt.number)
        except PublishFailed as failed:
            log.error("%s; the message goes back to the queue in 1s", failed,
                      extra={"event": self._event(raw, "requeued", attempt.duration)})
            # Not at once: a deleted retry queue or DLQ would make a tight loop. Declare
            # the topology again (someone may have deleted a queue), then requeue.
            await asyncio.sleep(1.0)
            try:
                await self.redeclare()
            except BROKER_ERRORS as exc:
                log.warning("declaring the queues again failed: %s", exc)
            await acker.nack(raw)
            return
        if raw.channel.is_closed:
            self._lost(attempt)  # the copy is out: the redelivery will be a duplicate
            return
        self.board.settle(outcome.action, outcome.reason, attempt.duration, attempt.number == 1,
                          attempt.settled_key)
        await acker.ack([raw], wait=True)
        self._log_outcome(raw, outcome, attempt.exc, attempt.number, attempt.duration)

    def _lost(self, attempt: Attempt) -> None:
        # The broker has requeued it already: the redelivery will be counted.
        log.info("connection lost before the ack; the broker will redeliver the message",
                 extra={"event": self._event(attempt.raw, "redelivered", attempt.duration)})

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


def _call(fn: Callable[[], None]) -> Callable[[asyncio.Task[None]], None]:
    return lambda _task: fn()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
