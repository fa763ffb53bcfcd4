"""rmqpool: a prefork pool of uvloop/aio-pika workers for CPU-heavy RabbitMQ consumers."""

from .exceptions import Reject, Retry, TimeLimitExceeded
from .message import Message
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["Message", "Reject", "Retry", "Settings", "TimeLimitExceeded", "__version__"]
