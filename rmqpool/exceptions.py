"""Exceptions a handler raises to choose a message's outcome."""

from __future__ import annotations

# Longest delay Retry(delay=S) accepts: the broker holds retries in TTL queues.
MAX_RETRY_DELAY = 7 * 24 * 3600.0


class Reject(Exception):
    """Send the message straight to the dead-letter queue, without retries."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Retry the message after `delay` seconds; counts as an attempt."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        # A bad delay is the handler's error, raised where the handler raises Retry.
        if delay is not None:
            if (isinstance(delay, bool) or not isinstance(delay, int | float)
                    or not 0 < delay <= MAX_RETRY_DELAY):  # nan fails the comparison too
                raise ValueError(f"Retry(delay={delay!r:.40}): delay must be a number of seconds "
                                 f"above 0 and at most {MAX_RETRY_DELAY:g} (7 days)")
            delay = float(delay)
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


class PublishError(Exception):
    """The broker did not take a message: nacked, a missing exchange, refused, or not
    confirmed in time. The message says which, and what to do."""


class BrokerRefused(PublishError):
    """The broker refused the credentials or the virtual host: trying again won't help."""


class PublishRefused(PublishError):
    """The broker refused the publish and closed the channel: no such exchange, no
    permission to write to it, or a property it does not take. Another message to the
    same exchange with the same properties is refused the same way."""


class Unroutable(PublishError):
    """Published with mandatory=True, but no queue is bound to its routing key."""


class RemoteError(Exception):
    """An RPC request was dead-lettered by the pool that handled it."""

    def __init__(self, reason: str, type: str, message: str) -> None:
        super().__init__(f"{reason}: {type}: {message}" if type else reason)
        self.reason = reason
        self.type = type
        self.message = message
