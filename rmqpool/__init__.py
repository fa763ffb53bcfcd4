"""rmqpool: a prefork pool of uvloop/aio-pika workers for CPU-heavy RabbitMQ consumers,
and the client side that puts messages in (Publisher, SyncPublisher)."""

from .client import Publisher, SyncPublisher
from .exceptions import (
    BrokerRefused,
    PublishError,
    Reject,
    RemoteError,
    Retry,
    TimeLimitExceeded,
    Unroutable,
)
from .message import Message
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["BrokerRefused", "Message", "PublishError", "Publisher", "Reject", "RemoteError",
           "Retry", "Settings", "SyncPublisher", "TimeLimitExceeded", "Unroutable", "__version__"]
