"""Reading a delivery: the handler's arguments, its attempt number and what identifies it.

Everything here is total over what a client can publish: anything rmqpool cannot
read (a body that is not what its content type says, a JSON document nested too
deep, an attempt header that is not a small whole number) raises
MalformedMessage and nothing else, so the message is dead-lettered as
`malformed` instead of crashing its worker.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import Any, cast

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from .exceptions import MalformedMessage
from .outgoing import Outgoing, outgoing
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
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise MalformedMessage(f"body is not valid JSON ({exc})") from None
    except RecursionError:
        raise MalformedMessage("body is JSON nested too deeply to decode") from None


MAX_ATTEMPT = 1_000_000  # far above any --max-retries; a larger header is not ours


def attempt_of(headers: dict[str, Any] | None) -> int:
    """The attempt number of this delivery: 1 unless rmqpool retried it. A header that
    rmqpool cannot have written is MalformedMessage."""
    value = headers.get(H_ATTEMPT) if headers else None
    if value is None:
        return 1
    if type(value) is not int or not 1 <= value <= MAX_ATTEMPT:  # bool is not an attempt
        raise MalformedMessage(
            f"header {H_ATTEMPT} is {_short(value)} ({type(value).__name__}); rmqpool sets it "
            f"to a whole number from 1 to {MAX_ATTEMPT}: don't set it when publishing")
    return value


def lenient_attempt(headers: dict[str, Any] | None) -> int:
    """The attempt number, or 0 when the header is unreadable (for keys only)."""
    try:
        return attempt_of(headers)
    except MalformedMessage:
        return 0


def identify(raw: DeliveredMessage, attempt: int) -> tuple[int, int]:
    """(message key, settled key) of one attempt of a message, for the supervisor.

    A message is identified by its message_id, a digest of its body and the attempt
    number together: producers reuse ids, and two different messages with one id must
    never be taken for each other. The message key (never 0) tracks poison messages
    across redeliveries; per attempt, so a time-limit kill is charged to the attempt it
    killed and the retry copy starts clean. The settled key recognises the redelivery of
    an attempt that was settled but whose ack was lost; only for messages with an id
    (0 otherwise): two identical messages without an id are two messages, and must never
    be skipped."""
    mid = raw.header.properties.message_id
    h = hashlib.blake2b(digest_size=8)
    if mid:
        encoded = mid.encode("utf-8", "surrogatepass")
        h.update(len(encoded).to_bytes(4, "big"))
        h.update(encoded)
    h.update(attempt.to_bytes(4, "big"))
    h.update(raw.body)
    key = int.from_bytes(h.digest(), "big") or 1
    return key, key if mid else 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Message:
    """What the broker delivered: headers, properties, routing and attempt number."""

    __slots__ = ("body", "headers", "routing_key", "exchange", "redelivered", "attempt",
                 "message_id", "correlation_id", "reply_to", "content_type",
                 "content_encoding", "timestamp", "type", "app_id", "priority", "expiration",
                 "delivery_tag", "outputs")

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
        self.outputs: list[Outgoing] = []  # what publish() asked for, sent after success

    def publish(self, body: Any, *, routing_key: str, exchange: str = "",
                headers: dict[str, Any] | None = None, message_id: str | None = None,
                correlation_id: str | None = None, priority: int | None = None,
                expiration: float | str | None = None, persistent: bool = True,
                mandatory: bool = True) -> str:
        """Publish a follow-up message through this worker's connection, from a sync or an
        async handler; returns its message id. Nothing is sent until the handler returns:
        the output of an attempt that fails is dropped (its retry publishes again), and
        all of it is confirmed by the broker before this message is acked. A body that
        cannot be encoded raises TypeError here, in the handler."""
        message = outgoing(body, routing_key=routing_key, exchange=exchange, headers=headers,
                           message_id=message_id or self._output_id(),
                           correlation_id=correlation_id,
                           priority=priority, expiration=expiration, persistent=persistent,
                           mandatory=mandatory)
        self.outputs.append(message)
        return message.message_id

    def _output_id(self) -> str | None:
        """The same on every run of this message (its id, body and the output's place), so
        a rerun after a crash publishes the same ids and a consumer can drop duplicates."""
        if not self.message_id:
            return None  # a random one: two identical id-less inputs are two inputs
        digest = hashlib.blake2b(self.body, digest_size=16).hexdigest()
        name = f"rmqpool-output:{self.message_id}:{digest}:{len(self.outputs)}"
        return uuid.uuid5(uuid.NAMESPACE_URL, name).hex

    @property
    def properties(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "content_type", "content_encoding", "message_id", "correlation_id", "reply_to",
            "timestamp", "type", "app_id", "priority", "expiration")}

    def __repr__(self) -> str:
        return (f"<Message id={self.message_id!r} routing_key={self.routing_key!r} "
                f"attempt={self.attempt} redelivered={self.redelivered} "
                f"bytes={len(self.body)}>")
