"""A message to publish, built once: the body encoded and its properties set.

Shared by the client (Publisher), handler output (Message.publish) and RPC replies,
so every message rmqpool sends is encoded by the same rules: bytes as they are;
dict, list, str, numbers, bool and None as JSON; anything else a TypeError naming
its type, before anything is sent.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pamqp import commands as spec
from pamqp import encode


@dataclass(frozen=True, slots=True)
class Outgoing:
    data: bytes
    properties: spec.Basic.Properties
    exchange: str
    routing_key: str
    mandatory: bool

    @property
    def message_id(self) -> str:
        return str(self.properties.message_id)


def encode_body(body: Any) -> tuple[bytes, str | None]:
    """(bytes, content type)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), None
    if not isinstance(body, dict | list | str | int | float | bool | type(None)):
        raise TypeError(f"cannot publish a body of type {type(body).__name__}: give bytes, "
                        "or a dict, list, str or number (sent as JSON)")
    try:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot publish this {type(body).__name__} as JSON: {exc}") from None
    return data, "application/json"


def outgoing(body: Any, *, routing_key: str, exchange: str = "",
             headers: Mapping[str, Any] | None = None, message_id: str | None = None,
             correlation_id: str | None = None, reply_to: str | None = None,
             priority: int | None = None, expiration: float | str | None = None,
             persistent: bool = True, mandatory: bool = True,
             content_type: str | None = None) -> Outgoing:
    """`expiration` in seconds (a number) or as the broker takes it (milliseconds, text)."""
    if not isinstance(routing_key, str):
        raise TypeError(f"routing_key must be a str, not {type(routing_key).__name__}")
    data, detected = encode_body(body)
    if isinstance(expiration, int | float):
        expiration = str(max(0, round(expiration * 1000)))
    kind = content_type or detected
    if headers and not all(isinstance(key, str) for key in headers):
        raise TypeError("header names must be str, not "
                        + ", ".join(sorted({type(k).__name__ for k in headers
                                            if not isinstance(k, str)})))
    if headers and len(str(headers)) > _HEADER_CHECK:
        _check_header_size(headers)
    props = spec.Basic.Properties(
        content_type=kind, content_encoding="utf-8" if kind == "application/json" else None,
        headers=dict(headers) if headers else None, delivery_mode=2 if persistent else 1,
        priority=priority, correlation_id=correlation_id, reply_to=reply_to,
        expiration=expiration, message_id=message_id or uuid.uuid4().hex,
        timestamp=datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    return Outgoing(data, props, exchange, routing_key, mandatory)


FRAME_MAX = 131072  # RabbitMQ's default frame_max: properties must fit in one frame
_HEADER_CHECK = 10_000  # headers shorter than this as text are far below it


def _check_header_size(headers: Mapping[str, Any]) -> None:
    """Headers that do not fit in one frame make the broker close the whole connection
    (FRAME_ERROR), which looks like a lost connection: refuse them here, clearly."""
    size = len(encode.field_table(dict(headers)))
    if size > FRAME_MAX - 1024:
        raise ValueError(f"the headers encode to {size} bytes, more than fit in one AMQP "
                         f"frame ({FRAME_MAX} bytes with the other properties): move large "
                         "values into the body")


DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
STATUS_HEADER = "x-rmqpool-status"


def reply(request: spec.Basic.Properties, body: Any, status: str) -> Outgoing:
    """The reply to an RPC request: to its reply_to through the default exchange, with
    its correlation id. Direct reply-to is published without mandatory (RabbitMQ 3.10
    delivers a mandatory one and returns it too); a named reply queue with it, so a
    requester that has gone away is noticed."""
    to = str(request.reply_to)
    return outgoing(body, routing_key=to, correlation_id=request.correlation_id,
                    headers={STATUS_HEADER: status}, persistent=False,
                    mandatory=not to.startswith(DIRECT_REPLY_TO))
