"""decide(exception, attempt, policy) -> Outcome: a pure function.

Publishing the retry copy or the dead-letter copy, and acking, is I/O and lives
in settle.py. Keeping the decision pure keeps it table-testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from .exceptions import MalformedMessage, Reject, Retry, TimeLimitExceeded, WorkerDied

if TYPE_CHECKING:
    from .settings import Settings


class Action(StrEnum):
    ACK = "acked"
    RETRY = "retried"
    DEAD_LETTER = "dead_lettered"


class Reason(StrEnum):
    """Why a message was dead-lettered (a metric label: a small fixed set)."""

    MAX_RETRIES = "max_retries"
    REJECTED = "rejected"
    MALFORMED = "malformed"
    POISON = "poison"
    TIME_LIMIT = "time_limit"


class Death(StrEnum):
    """Why a worker died while running a message (charged to that message)."""

    CRASH = "crash"  # it exited or was killed from outside
    HEARTBEAT = "heartbeat"  # its event loop stopped beating; the supervisor killed it
    TIME_LIMIT = "time_limit"  # a sync handler overran --time-limit; the supervisor killed it
    INTERNAL = "internal"  # rmqpool itself failed handling it (a bug; see the log)


REASONS = tuple(Reason)


@dataclass(frozen=True)
class Policy:
    max_retries: int
    delays: tuple[float, ...]
    max_worker_deaths: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.max_retries, settings.retry_delays, settings.max_worker_deaths)

    def delay_for(self, attempt: int) -> float:
        """Delay before attempt `attempt + 1`, after attempt `attempt` failed."""
        return self.delays[min(attempt, len(self.delays)) - 1]


@dataclass(frozen=True)
class Outcome:
    action: Action
    delay: float = 0.0  # for RETRY
    reason: Reason | None = None  # for DEAD_LETTER


ACK = Outcome(Action.ACK)


def decide(exc: BaseException | None, attempt: int, policy: Policy) -> Outcome:
    """What to do with a message whose attempt number `attempt` (1-based) ended in `exc`."""
    if exc is None:
        return ACK
    if isinstance(exc, Reject):
        return Outcome(Action.DEAD_LETTER, reason=Reason.REJECTED)
    if isinstance(exc, MalformedMessage):
        return Outcome(Action.DEAD_LETTER, reason=Reason.MALFORMED)
    if isinstance(exc, WorkerDied) and exc.deaths >= policy.max_worker_deaths:
        return Outcome(Action.DEAD_LETTER, reason=_final_reason(exc))
    if attempt > policy.max_retries:
        return Outcome(Action.DEAD_LETTER, reason=_final_reason(exc))
    if isinstance(exc, Retry) and exc.delay is not None:
        return Outcome(Action.RETRY, delay=exc.delay)
    return Outcome(Action.RETRY, delay=policy.delay_for(attempt))


def charge(deaths: int, reason: str, policy: Policy) -> WorkerDied | None:
    """Before a redelivered message runs again: what its worker deaths mean.

    None: run it again now (a crash, a kill or OOM below --max-worker-deaths costs no
    attempt, so an unlucky message is not penalised). Otherwise the failure to decide()
    on: too many deaths (dead-letter), or a time-limit kill (charged an attempt)."""
    if deaths and (deaths >= policy.max_worker_deaths or reason == Death.TIME_LIMIT):
        return WorkerDied(deaths, reason)
    return None


def _final_reason(exc: BaseException) -> Reason:
    if isinstance(exc, TimeLimitExceeded):
        return Reason.TIME_LIMIT
    if isinstance(exc, WorkerDied):
        return Reason.TIME_LIMIT if exc.reason == Death.TIME_LIMIT else Reason.POISON
    return Reason.MAX_RETRIES
