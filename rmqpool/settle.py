"""Settling decided attempts, on the worker's loop: every delivery ends acked, returned
to the queue, or copied (retry or dead letter) and then acked. Nothing else.

    Attempt (outcome decided) -> ack            (counted just before the ack)
                              -> copy, confirm, ack
                              -> copy refused: back to the queue after 1 s

A retry or dead-letter copy is confirmed by the broker before its original is
acked. When the channel closed after the work was done, the outcome is recorded
(counted, and its settled key remembered) so that the redelivery is acked without
running again. A failure of rmqpool's own while settling (a bug) is charged to the
message like a worker death, so the poison rule ends it instead of a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import random
import traceback
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import encode
from pamqp.common import FieldTable

from . import topology as t
from .ack import Acker
from .broker_errors import BROKER_ERRORS, translated
from .dispatch import Attempt, deliver_frame
from .exceptions import Retry, Unroutable, WorkerDied
from .log import message_event
from .outcome import Action, Outcome, Policy, decide
from .outgoing import STATUS_HEADER, Outgoing, reply
from .publisher import ChannelPublisher, PublishFailed
from .scoreboard import Scoreboard
from .settings import Settings

log = logging.getLogger("rmqpool.settle")

TRACEBACK_LIMIT = 4000
EXC_MESSAGE_LIMIT = 1000
REQUEUE_DELAY = 1.0  # a refused copy waits this long before its original is requeued


class Tiers:
    """Retry queue names by delay: the configured tiers are declared at start; a
    handler's Retry(delay=S) is rounded up to the grid (topology.RETRY_GRID) and its
    queue declared on first use, on a channel of its own (a 406 closes its channel).
    A tier queue the broker will not declare as rmqpool's (it exists with other
    arguments, maybe without the TTL that brings messages back, or it is another
    connection's exclusive queue) is not used: the retry waits in the nearest
    configured tier instead, which was declared at start and is known to work."""

    def __init__(self, settings: Settings, connection: aio_pika.abc.AbstractConnection):
        self._settings = settings
        self._connection = connection
        self.names = {d: t.retry_queue_name(settings.queue, d)
                      for d in t.retry_delays(settings)}
        self.fallbacks: dict[float, str] = {}

    def extra(self) -> list[float]:
        """Tiers declared on demand (to declare again after a queue went missing)."""
        configured = t.retry_delays(self._settings)
        return [d for d in self.names if d not in configured and d not in self.fallbacks]

    async def name_for(self, delay: float, exact: bool) -> tuple[float, str]:
        """(the delay the retry will wait, its queue)."""
        if not exact:
            return delay, self.names[delay]
        delay = t.tier_for(delay, self._settings)
        name = self.names.get(delay)
        if name is None:
            spec = t.retry_queue(self._settings, delay)
            try:
                with translated():
                    channel = await self._connection.channel(publisher_confirms=False)
                    async with channel:
                        await channel.declare_queue(spec.name, durable=True,
                                                    arguments=spec.arguments)
                name = spec.name
            except aiormq.exceptions.AMQPChannelError as exc:  # refused, not a lost line
                configured = t.retry_delays(self._settings)
                fallback = min((d for d in configured if d >= delay), default=max(configured))
                name = self.fallbacks[delay] = self.names[fallback]
                log.warning("retry queue %r cannot be rmqpool's (%s); retries of %gs wait in "
                            "%r instead", spec.name, exc.args[-1] if exc.args else exc, delay,
                            name)
            except BROKER_ERRORS as exc:
                raise PublishFailed(f"declaring retry queue {spec.name!r} failed: "
                                    f"{type(exc).__name__}: {exc}") from None
            self.names[delay] = name
        declared = t.retry_delays(self._settings)
        for tier, queue in self.names.items():  # the delay of the queue used
            if queue == name and tier in declared:
                return tier, name
        return delay, name


class Settler:
    def __init__(self, settings: Settings, slot: int, board: Scoreboard,
                 publisher: ChannelPublisher,
                 tiers: Tiers, redeclare: Callable[[], Awaitable[None]],
                 charge: Callable[[int], None]):
        self.settings = settings
        self.slot = slot
        self.board = board
        self.publisher = publisher
        self.tiers = tiers
        self.redeclare = redeclare
        self.charge = charge  # tell the supervisor: rmqpool failed on this message key
        self.policy = Policy.from_settings(settings)
        self.acker = Acker()
        self.republishing: set[asyncio.Task[None]] = set()
        self._debug = log.isEnabledFor(logging.DEBUG)

    async def settle(self, batch: list[Attempt]) -> None:
        """Acks are counted and sent together (one frame for a run of deliveries); each
        copy is published, confirmed, and only then its original acked."""
        acks = []
        for attempt in batch:
            if attempt.outcome is None:
                log.info("redelivered, but a worker had settled it (its ack was lost): acked "
                         "without running or counting it again",
                         extra={"event": self._event(attempt, "acked")})
                acks.append(attempt.raw)
            elif attempt.outcome.action is Action.ACK and not attempt.outputs:
                if self._record(attempt, attempt.outcome):
                    acks.append(attempt.raw)
                    if self._debug:
                        log.debug("acked", extra={"event": self._event(attempt, "acked")})
            else:
                task = asyncio.create_task(self._publish_then_ack(attempt, attempt.outcome))
                self.republishing.add(task)
                task.add_done_callback(self.republishing.discard)
                if attempt.settled is not None:
                    task.add_done_callback(_calling(attempt.settled))
        if acks:
            await self.acker.ack(acks)

    def _record(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Count the outcome just before its ack; False when the ack cannot be sent.

        If the channel has closed, the broker redelivers the message. The work is done,
        so when the message can be recognised (it has an id) the outcome is recorded
        anyway and the redelivery is acked without running again; otherwise nothing is
        counted and the redelivery runs and counts once."""
        closed = attempt.raw.channel.is_closed
        if closed:
            log.info("connection lost before the ack; the broker will redeliver the message%s",
                     "" if attempt.settled_key else " (no message id: it will run again)",
                     extra={"event": self._event(attempt, "redelivered")})
            if not attempt.settled_key:
                return False
        self.board.settle(outcome.action, outcome.reason, attempt.duration, attempt.number == 1,
                          attempt.settled_key)
        return not closed

    async def _publish_then_ack(self, attempt: Attempt, outcome: Outcome) -> None:
        raw = attempt.raw
        try:
            outcome = await self._publish(attempt, outcome)
        except PublishFailed as failed:
            log.error("%s; the message goes back to the queue in %gs", failed, REQUEUE_DELAY,
                      extra={"event": self._event(attempt, "requeued")})
            if failed.refused:  # the broker will refuse it again: the poison rule ends it
                self.charge(attempt.key)
            # Not at once: a deleted retry queue or DLQ would make a tight loop. Declare
            # the topology again (someone may have deleted a queue), then requeue.
            await asyncio.sleep(REQUEUE_DELAY)
            try:
                with translated():
                    await self.redeclare()
            except BROKER_ERRORS as exc:
                log.warning("declaring the queues again failed: %s", exc)
            await self.acker.nack(raw)
            return
        except Exception:
            log.critical("internal error settling a message; it goes back to the queue in %gs "
                         "and is charged like a worker death (the poison rule ends it)",
                         REQUEUE_DELAY, exc_info=True,
                         extra={"event": self._event(attempt, "requeued")})
            self.charge(attempt.key)
            await asyncio.sleep(REQUEUE_DELAY)
            await self.acker.nack(raw)
            return
        if self._record(attempt, outcome):
            await self.acker.ack([raw], wait=True)
        self._log_outcome(attempt, outcome)

    async def _publish(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        """What the outcome publishes: the handler's output and its reply, or a retry or
        dead-letter copy (and an error reply). Output that no queue takes is the
        attempt's failure: the message is retried, and dead-lettered in the end."""
        if outcome.action is Action.ACK:
            # The reply only once the output is in: if no queue takes the output, the
            # attempt has failed and is retried, and a retry must not have replied.
            lost = await self.publisher.publish_all(
                [m for m in attempt.outputs if not _is_reply(m)])
            if not lost:
                if await self.publisher.publish_all([m for m in attempt.outputs
                                                     if _is_reply(m)]):
                    log.debug("the requester has gone: its reply was unroutable",
                              extra={"event": self._event(attempt, "acked")})
                return outcome
            attempt.exc = Unroutable(
                f"the handler's output to {lost[0].routing_key!r} on "
                f"{lost[0].exchange or 'the default exchange'!r} was unroutable (no queue is "
                "bound to it)")
            outcome = decide(attempt.exc, attempt.number, self.policy)
        outcome = await self._copy(attempt, outcome)
        if outcome.action is Action.DEAD_LETTER and attempt.raw.header.properties.reply_to:
            await self._error_reply(attempt, outcome)
        return outcome

    async def _error_reply(self, attempt: Attempt, outcome: Outcome) -> None:
        """Tell the requester its request was dead-lettered (best effort: the dead letter
        is the record)."""
        exc = attempt.exc
        body = {"reason": str(outcome.reason), "type": type(exc).__qualname__ if exc else "",
                "message": _safe_str(exc)[:EXC_MESSAGE_LIMIT] if exc else ""}
        try:
            if not await self.publisher.publish(reply(attempt.raw.header.properties, body,
                                                      "error")):
                log.debug("the requester has gone: its error reply was unroutable")
        except PublishFailed as failed:
            log.warning("the error reply was not published: %s", failed)

    async def _copy(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        """Publish the copy; returns the outcome with the delay the retry really waits."""
        raw, exc = attempt.raw, attempt.exc
        if outcome.action is Action.RETRY:
            exact = isinstance(exc, Retry) and exc.delay is not None  # kept, rounded up
            delay = outcome.delay if exact else random.choice(
                t.jittered(outcome.delay, self.settings.retry_jitter))
            delay, target = await self.tiers.name_for(delay, exact)
            outcome = dataclasses.replace(outcome, delay=delay)
        else:
            target = t.dlq_name(self.settings.queue)
        headers = copy_headers(raw, outcome, exc, attempt.number, self.settings.queue, self.slot)
        await self.publisher.republish(raw, target, headers)
        return outcome

    def _event(self, attempt: Attempt, outcome: str) -> dict[str, object]:
        return message_event(attempt.raw, self.settings.queue, outcome, attempt.duration)

    def _log_outcome(self, attempt: Attempt, outcome: Outcome) -> None:
        event = self._event(attempt, outcome.action.value)
        if outcome.action is Action.ACK:
            if self._debug:
                log.debug("acked after %d output message(s) were confirmed",
                          len(attempt.outputs), extra={"event": event})
            return
        event["attempt"] = attempt.number
        what = _describe(attempt.exc)
        if outcome.action is Action.RETRY:
            event["delay"] = outcome.delay
            log.warning("attempt %d failed (%s); retrying in %gs", attempt.number, what,
                        outcome.delay, extra={"event": event})
        else:
            event["reason"] = outcome.reason
            log.error("dead-lettered to %s (%s): %s", t.dlq_name(self.settings.queue),
                      outcome.reason, what, extra={"event": event})


def _is_reply(message: Outgoing) -> bool:
    return bool(message.properties.headers and STATUS_HEADER in message.properties.headers)


def _calling(fn: Callable[[], None]) -> Callable[[asyncio.Task[None]], None]:
    return lambda _task: fn()


def copy_headers(raw: DeliveredMessage, outcome: Outcome, exc: BaseException | None,
                 attempt: int, queue: str, slot: int) -> FieldTable:
    """The headers of a retry or dead-letter copy of `raw`. Total: whatever the original
    carried and whatever the handler raised, this returns headers that encode."""
    props = raw.header.properties
    headers: FieldTable = dict(props.headers or {})
    headers.setdefault(t.H_ROUTING_KEY, deliver_frame(raw).routing_key or "")
    headers.setdefault(t.H_EXCHANGE, deliver_frame(raw).exchange or "")
    if props.user_id is not None:
        headers.setdefault(t.H_USER_ID, props.user_id)
    if props.expiration is not None:
        headers.setdefault(t.H_EXPIRATION, props.expiration)
    if isinstance(exc, WorkerDied):
        headers[t.H_DEATHS] = exc.deaths
    if outcome.action is Action.RETRY:
        headers[t.H_ATTEMPT] = attempt + 1
        return _encodable(headers)
    headers.update({
        t.H_ATTEMPT: attempt,
        t.H_REASON: str(outcome.reason),
        t.H_QUEUE: queue,
        t.H_FAILED_AT: datetime.datetime.now(datetime.UTC).isoformat(),
        t.H_WORKER: slot,
    })
    if exc is not None:
        headers[t.H_EXC_TYPE] = type(exc).__qualname__
        headers[t.H_EXC_MESSAGE] = _safe_str(exc)[:EXC_MESSAGE_LIMIT]
        headers[t.H_TRACEBACK] = _safe_traceback(exc)[-TRACEBACK_LIMIT:]
    return _encodable(headers)


def _encodable(headers: FieldTable) -> FieldTable:
    """`headers` if they encode and the broker takes them; else without the values that
    don't, whose repr is kept in one string header."""
    try:
        check_encodable(headers)
        return headers
    except Exception:
        pass
    kept: FieldTable = {}
    dropped = {}
    for key, value in headers.items():
        try:
            check_encodable({key: value})
            kept[key] = value
        except Exception:
            dropped[str(key)] = value
    kept[t.H_UNENCODABLE] = _safe_str(dropped)[:EXC_MESSAGE_LIMIT]
    return kept


def check_encodable(table: FieldTable) -> None:
    """Raises unless `table` encodes and holds no inf or nan (the broker closes the
    connection on those: 541 INTERNAL_ERROR)."""
    encode.field_table(table)
    stack: list[object] = [table]
    while stack:
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("inf or nan")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}: str() failed>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return f"{type(exc).__qualname__}: <traceback could not be formatted>"


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {_safe_str(exc)}" if exc is not None else ""
