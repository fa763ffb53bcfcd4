"""The one list of exceptions that mean "the broker, the connection or the channel
failed" (as opposed to a bug): caught where a delivery, an ack or a publish meets
the broker, and nowhere wider."""

import contextlib
from collections.abc import Iterator

import aiormq

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,  # channel/connection closed by the broker, returns, nacks
    aiormq.exceptions.ChannelInvalidStateError,  # the channel is closed or was replaced
    ConnectionError,  # ConnectionCut included
    TimeoutError,
)


class ConnectionCut(ConnectionError):
    """A call cut short by a lost connection, for which aiormq raised a bare Exception."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Around calls into aiormq: its bare `Exception` (the default of its task wrapper,
    raised when the connection goes mid-call) becomes ConnectionCut, one of
    BROKER_ERRORS. Any other exception passes unchanged."""
    try:
        yield
    except Exception as exc:
        if type(exc) is Exception:
            raise ConnectionCut(str(exc) or "the connection was lost during the call") from exc
        raise
