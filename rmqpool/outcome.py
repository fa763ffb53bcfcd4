"""decide(exception, attempt, policy) -> Outcome: a pure function.

Publishing the retry copy or the dead-letter copy, and acking, is I/O and lives
in dispatch.py. Keeping the decision pure keeps it table-testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .exceptions import MalformedMessage, Reject, Retry, TimeLimitExceeded, WorkerDied


class Action(StrEnum):
    ACK = "acked"
    RETRY = "retried"
    DEAD_LETTER = "dead_lettered"


# The fixed set of dead-letter reasons (a metric label: keep it small).
REASONS = ("max_retries", "rejected", "malformed", "poison", "time_limit")


@dataclass(frozen=True)
class Policy:
    max_retries: int = 3
    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    max_worker_deaths: int = 3

    def delay_for(self, attempt: int) -> float:
        """Delay before attempt `attempt + 1`, after attempt `attempt` failed."""
        return self.delays[min(attempt, len(self.delays)) - 1]


@dataclass(frozen=True)
class Outcome:
    action: Action
    delay: float = 0.0  # for RETRY
    reason: str = ""  # for DEAD_LETTER, one of REASONS


ACK = Outcome(Action.ACK)


def decide(exc: BaseException | None, attempt: int, policy: Policy) -> Outcome:
    """What to do with a message whose attempt number `attempt` (1-based) ended in `exc`."""
    if exc is None:
        return ACK
    if isinstance(exc, Reject):
        return Outcome(Action.DEAD_LETTER, reason="rejected")
    if isinstance(exc, MalformedMessage):
        return Outcome(Action.DEAD_LETTER, reason="malformed")
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
    if deaths and (deaths >= policy.max_worker_deaths or reason == "time_limit"):
        return WorkerDied(deaths, reason)
    return None


def _final_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeLimitExceeded):
        return "time_limit"
    if isinstance(exc, WorkerDied):
        return "time_limit" if exc.reason == "time_limit" else "poison"
    return "max_retries"
