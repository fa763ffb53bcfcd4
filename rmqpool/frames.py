"""Deliveries whose properties cannot be decoded still reach rmqpool (worker process).

pamqp, under aiormq, decodes a message's properties when its content header frame
arrives; a property it cannot decode (a timestamp out of datetime's range, a header
table nested deeper than the recursion limit) raises there, aiormq closes the whole
connection, the broker redelivers the message, and the worker loops on it forever,
stalling its queue. install() makes that one frame decodable instead: the body size
(needed to read the body frames) is kept, the properties are replaced by one header
saying what failed, and reading the delivery then finds it malformed, so it is
dead-lettered with the error (its body byte-identical; its properties could not be
read, so they cannot be kept).
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands as spec
from pamqp.header import ContentHeader

from .topology import H_UNDECODABLE

_plain_unmarshal = ContentHeader.unmarshal


def install() -> None:
    ContentHeader.unmarshal = _unmarshal_or_mark  # type: ignore[method-assign]


def _unmarshal_or_mark(self: ContentHeader, data: bytes) -> None:
    try:
        _plain_unmarshal(self, data)
    except struct.error:
        raise  # not even a header frame: aiormq's own error stands
    except Exception as exc:  # ValueError, OverflowError, RecursionError, ...
        self.class_id, self.weight, self.body_size = struct.unpack(">HHQ", data[0:12])
        why = f"{type(exc).__name__}: {exc}"
        self.properties = spec.Basic.Properties(headers={H_UNDECODABLE: why[:500]})


def undecodable(headers: dict[str, Any] | None) -> str | None:
    """Why the properties of a delivery could not be decoded, if they could not."""
    return str(headers[H_UNDECODABLE]) if headers and H_UNDECODABLE in headers else None
