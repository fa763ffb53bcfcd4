"""The one list of exceptions that mean "the broker, the connection or the channel
failed" (as opposed to a bug): caught where a delivery, an ack or a publish meets
the broker, and nowhere wider."""

import aiormq

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,  # channel/connection closed by the broker, returns, nacks
    aiormq.exceptions.ChannelInvalidStateError,  # the channel is closed or was replaced
    ConnectionError,
    TimeoutError,
)
