"""rmqpool: a prefork pool of uvloop/aio-pika workers for CPU-heavy RabbitMQ consumers,
and the client side that puts messages in (Publisher, SyncPublisher).

The names below are imported on first use, so `python -m rmqpool` installs its signal
handlers before aio-pika and the rest are imported (a SIGTERM during start-up waits
for the supervisor's loop instead of killing it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Publisher": "client", "SyncPublisher": "client",
    "PublishError": "exceptions", "Reject": "exceptions", "RemoteError": "exceptions",
    "Retry": "exceptions", "TimeLimitExceeded": "exceptions", "Unroutable": "exceptions",
    "BrokerRefused": "exceptions", "PublishRefused": "exceptions",
    "Message": "message", "Settings": "settings",
}
__all__ = ["BrokerRefused", "Message", "PublishError", "PublishRefused", "Publisher", "Reject",
           "RemoteError", "Retry", "Settings", "SyncPublisher", "TimeLimitExceeded",
           "Unroutable", "__version__"]

if TYPE_CHECKING:
    from .client import Publisher, SyncPublisher
    from .exceptions import (
        BrokerRefused,
        PublishError,
        PublishRefused,
        Reject,
        RemoteError,
        Retry,
        TimeLimitExceeded,
        Unroutable,
    )
    from .message import Message
    from .settings import Settings


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rmqpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
