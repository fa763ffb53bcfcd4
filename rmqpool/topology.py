"""Every queue and exchange name rmqpool uses, and their arguments, in one place.

    <queue>                  the work queue (classic or quorum)
    <queue>.retry.<delay>    one per delay tier: queue-level TTL, dead-letters back to <queue>
    <queue>.dlq              where messages end after their last attempt

Retry copies are published to the default exchange with the tier's name as the
routing key; when the tier's TTL expires the broker dead-letters them to the
default exchange with routing key <queue>. One queue per tier means no message
waits behind a longer one (per-message TTL blocks the head of the line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # settings validates --queue-arg against own_work_queue_args()
    from .settings import Settings

# Headers rmqpool sets on the copies it republishes.
H_ATTEMPT = "x-rmqpool-attempt"
H_DEATHS = "x-rmqpool-worker-deaths"
H_ROUTING_KEY = "x-rmqpool-original-routing-key"
H_EXCHANGE = "x-rmqpool-original-exchange"
H_QUEUE = "x-rmqpool-original-queue"
H_REASON = "x-rmqpool-reason"
H_EXC_TYPE = "x-rmqpool-exception-type"
H_EXC_MESSAGE = "x-rmqpool-exception-message"
H_TRACEBACK = "x-rmqpool-traceback"
H_FAILED_AT = "x-rmqpool-failed-at"
H_WORKER = "x-rmqpool-worker-slot"
# Properties a copy cannot carry (the broker refuses a user_id that is not the pool's
# user; an expiration would let a retry or dead letter vanish) are kept here instead.
H_USER_ID = "x-rmqpool-original-user-id"
H_EXPIRATION = "x-rmqpool-original-expiration"
# Headers of the original that cannot be encoded again (e.g. a double too large for
# the float type a client library re-encodes it as): their repr, so nothing is lost.
H_UNENCODABLE = "x-rmqpool-unencodable-headers"
# On a delivery whose properties could not be decoded (see frames.py): the error.
H_UNDECODABLE = "x-rmqpool-undecodable-properties"

# A quorum work queue dead-letters a message redelivered this many times (a
# backstop under rmqpool's own poison tracking, which works on classic queues too).
QUORUM_DELIVERY_LIMIT = 20


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


def retry_queue_name(queue: str, delay: float) -> str:
    return f"{queue}.retry.{_delay_label(delay)}"


def _delay_label(delay: float) -> str:
    ms = round(delay * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]


def _type_args(queue_type: str) -> dict[str, Any]:
    if queue_type == "quorum":
        # At-least-once dead-lettering needs reject-publish; without it the broker
        # silently falls back to at-most-once.
        return {"x-queue-type": "quorum", "x-overflow": "reject-publish",
                "x-dead-letter-strategy": "at-least-once"}
    return {}


def own_work_queue_args(queue_type: str, queue: str = "<queue>") -> dict[str, Any]:
    """The work queue's arguments rmqpool sets itself (--queue-arg may not set them)."""
    args = _type_args(queue_type)
    if queue_type == "quorum":
        args |= {"x-delivery-limit": QUORUM_DELIVERY_LIMIT, "x-dead-letter-exchange": "",
                 "x-dead-letter-routing-key": dlq_name(queue)}
    return args


def work_queue(settings: Settings) -> QueueSpec:
    own = own_work_queue_args(settings.queue_type, settings.queue)
    return QueueSpec(settings.queue, settings.queue_arguments | own)


def retry_queue(settings: Settings, delay: float) -> QueueSpec:
    args = _type_args(settings.queue_type) | {
        "x-message-ttl": round(delay * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.queue,
    }
    return QueueSpec(retry_queue_name(settings.queue, delay), args)


def dead_letter_queue(settings: Settings) -> QueueSpec:
    return QueueSpec(dlq_name(settings.queue), _type_args(settings.queue_type))


JITTER_STEPS = 4  # queues per retry tier when --retry-jitter is set


def jittered(delay: float, jitter: float) -> tuple[float, ...]:
    """The delays a retry of tier `delay` may wait: each has a queue of its own, so no
    message waits behind a longer one. Rounded to whole milliseconds."""
    if not jitter:
        return (delay,)
    steps = [delay * (1 - jitter * i / (JITTER_STEPS - 1)) for i in range(JITTER_STEPS)]
    return tuple(sorted({round(d, 3) for d in steps}))


# Retry(delay=S) waits in the smallest of these (or of the --retry-delays tiers) that is
# at least S, so handler-chosen delays make at most len(RETRY_GRID) extra queues.
RETRY_GRID: tuple[float, ...] = (
    0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 15, 20, 30, 45,  # seconds
    60, 120, 180, 300, 600, 900, 1200, 1800, 2700,  # minutes
    3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)  # hours and days


def tier_for(delay: float, settings: Settings) -> float:
    """The retry tier a handler's Retry(delay=S) waits in (rounded up, never down)."""
    candidates = sorted({*settings.retry_delays, *RETRY_GRID})
    return next((c for c in candidates if c >= delay), candidates[-1])


def retry_delays(settings: Settings) -> list[float]:
    """Every delay that has a retry queue declared at start."""
    return sorted({d for tier in settings.retry_delays
                   for d in jittered(tier, settings.retry_jitter)})


def all_queues(settings: Settings) -> list[QueueSpec]:
    """The work queue, its DLQ and its retry tiers, in the order they are declared: the
    work queue first, so that a clash with an existing one (the usual 406) stops the
    start before anything else is created."""
    tiers = [retry_queue(settings, d) for d in retry_delays(settings)]
    return [work_queue(settings), dead_letter_queue(settings), *tiers]
