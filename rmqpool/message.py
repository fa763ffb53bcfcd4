"""The message object a handler receives as its optional second argument."""

from __future__ import annotations

import datetime
import json
from typing import Any, cast

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from .exceptions import MalformedMessage
from .topology import H_ATTEMPT, H_EXCHANGE, H_ROUTING_KEY

_TEXT_ENCODINGS = {None, "", "utf-8", "utf8", "UTF-8"}


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


def decode_body(body: bytes, content_type: str | None, content_encoding: str | None) -> Any:
    """Parsed JSON when the content type says JSON, else the raw bytes."""
    if not is_json(content_type):
        return body
    if content_encoding not in _TEXT_ENCODINGS:
        raise MalformedMessage(
            f"content-type {content_type} with content-encoding {content_encoding!r} is not "
            "supported; publish JSON as UTF-8 text")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"body is not valid JSON ({exc})") from None


def attempt_of(headers: dict[str, Any] | None) -> int:
    """The attempt number of this delivery: 1 unless rmqpool retried it."""
    if not headers:
        return 1
    try:
        return max(1, int(headers.get(H_ATTEMPT, 1)))
    except (TypeError, ValueError):
        return 1


class Message:
    """What the broker delivered: headers, properties, routing and attempt number."""

    __slots__ = ("body", "headers", "routing_key", "exchange", "redelivered", "attempt",
                 "message_id", "correlation_id", "reply_to", "content_type",
                 "content_encoding", "timestamp", "type", "app_id", "priority", "expiration",
                 "delivery_tag")

    def __init__(self, raw: DeliveredMessage, attempt: int) -> None:
        props = raw.header.properties
        headers = dict(props.headers or {})
        delivery = cast(spec.Basic.Deliver, raw.delivery)
        self.body: bytes = raw.body
        self.headers: dict[str, Any] = headers
        # A retried copy comes back through the default exchange; show where it first came from.
        self.routing_key: str = str(headers.get(H_ROUTING_KEY, delivery.routing_key or ""))
        self.exchange: str = str(headers.get(H_EXCHANGE, delivery.exchange or ""))
        self.redelivered: bool = bool(delivery.redelivered)
        self.attempt: int = attempt
        self.message_id: str | None = props.message_id
        self.correlation_id: str | None = props.correlation_id
        self.reply_to: str | None = props.reply_to
        self.content_type: str | None = props.content_type
        self.content_encoding: str | None = props.content_encoding
        self.timestamp: datetime.datetime | None = props.timestamp
        self.type: str | None = props.message_type
        self.app_id: str | None = props.app_id
        self.priority: int | None = props.priority
        self.expiration: str | None = props.expiration
        self.delivery_tag: int = cast(int, delivery.delivery_tag)

    @property
    def properties(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "content_type", "content_encoding", "message_id", "correlation_id", "reply_to",
            "timestamp", "type", "app_id", "priority", "expiration")}

    def __repr__(self) -> str:
        return (f"<Message id={self.message_id!r} routing_key={self.routing_key!r} "
                f"attempt={self.attempt} redelivered={self.redelivered} "
                f"bytes={len(self.body)}>")
