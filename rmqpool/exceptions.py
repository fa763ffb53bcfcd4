"""Exceptions a handler raises to choose a message's outcome."""

from __future__ import annotations


class Reject(Exception):
    """Send the message straight to the dead-letter queue, without retries."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Retry the message after `delay` seconds; counts as an attempt."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        if delay is not None and delay <= 0:
            raise ValueError(f"Retry(delay={delay}): delay must be > 0 seconds")
        super().__init__(reason)
        self.delay = delay


class TimeLimitExceeded(Exception):
    """An async handler ran past --time-limit and was cancelled."""


class WorkerDied(Exception):
    """The worker running this message died (exit, signal, OOM or hang)."""

    def __init__(self, deaths: int, reason: str) -> None:
        super().__init__(f"the message was running when its worker died ({reason}); "
                         f"{deaths} worker death(s) so far")
        self.deaths = deaths
        self.reason = reason


class MalformedMessage(Exception):
    """The body could not be decoded as its content type claims."""
