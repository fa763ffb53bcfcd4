"""Deliveries as aiormq hands them to rmqpool, built from real pamqp frames (for unit
tests of the pure reading and copying code; no broker involved)."""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader


def delivery(body: bytes = b"{}", *, message_id: str | None = "m1",
             headers: dict[str, Any] | None = None, content_type: str | None = "application/json",
             content_encoding: str | None = None, tag: int = 1, redelivered: bool = False,
             channel: Any = None, **properties: Any) -> DeliveredMessage:
    props = spec.Basic.Properties(message_id=message_id, headers=headers,
                                  content_type=content_type, content_encoding=content_encoding,
                                  **properties)
    frame = spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, redelivered=redelivered,
                               exchange="ex", routing_key="rk")
    return DeliveredMessage(frame, ContentHeader(0, len(body), props), body, channel)
