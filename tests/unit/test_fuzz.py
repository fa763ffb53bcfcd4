"""Fuzzing what comes from outside, bounded for CI (hypothesis; no example database, so
every run explores afresh; tests/fuzz_corpus/ holds inputs that once broke rmqpool and
always run).

- the delivery path: whatever a client can publish (any header table the AMQP field
  table decoder accepts, any body, content type and encoding), reading it raises
  MalformedMessage or nothing, identifying it never raises, and its retry and
  dead-letter copies always carry headers that encode and that the broker takes;
- the control channel: any bytes, in any chunks, decode to valid messages or nothing.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import decode

from rmqpool import control
from rmqpool.exceptions import MalformedMessage
from rmqpool.message import Message, attempt_of, decode_body, identify, lenient_attempt
from rmqpool.outcome import Action, Outcome, Reason
from rmqpool.settle import check_encodable, copy_headers
from tests.support.frames import delivery

CORPUS = pathlib.Path(__file__).parent.parent / "fuzz_corpus"
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Field values as other clients send them: every AMQP 0-9-1 field type RabbitMQ passes on.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
header_keys = st.sampled_from(["x-rmqpool-attempt", "x-rmqpool-worker-deaths",
                               "x-rmqpool-original-routing-key", "x-death", "a", "b"])
tables = st.dictionaries(header_keys | st.text(max_size=8), values, max_size=6)
content_types = st.sampled_from([None, "", "application/json", "text/plain",
                                 "application/x+json; charset=utf-8", "APPLICATION/JSON"])
encodings = st.sampled_from([None, "", "utf-8", "UTF-8", "gzip", "latin-1"])
bodies = st.binary(max_size=64) | st.builds(
    lambda n, b: b"[" * n + b + b"]" * n, st.integers(0, 5000), st.sampled_from([b"", b"1"]))

DEAD = Outcome(Action.DEAD_LETTER, reason=Reason.MALFORMED)
RETRY = Outcome(Action.RETRY, delay=1.0)


def _read_all(body, headers, content_type, content_encoding):
    raw = delivery(body, headers=headers, content_type=content_type,
                   content_encoding=content_encoding)
    identify(raw, lenient_attempt(headers))
    try:
        attempt_of(headers)
        decode_body(body, content_type, content_encoding)
        Message(raw, 1).properties  # noqa: B018
    except MalformedMessage:
        pass
    for outcome in (DEAD, RETRY):
        check_encodable(copy_headers(raw, outcome, ValueError("x"), 1, "q", 0))


@FUZZ
@given(tables, bodies, content_types, encodings)
def test_reading_a_delivery_is_total(headers, body, content_type, content_encoding):
    _read_all(body, headers, content_type, content_encoding)


@FUZZ
@given(st.binary(max_size=200))
def test_any_wire_field_table_is_read_and_copied_safely(data):
    """Tables as the wire decoder produces them (doubles, unsigned 64-bit integers,
    decimals, timestamps, byte arrays...), including types our encoder lacks."""
    framed = len(data).to_bytes(4, "big") + data
    try:
        _, headers = decode.field_table(framed)
    except Exception:
        return
    _read_all(b"{}", headers, "application/json", None)


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=10))
def test_the_control_decoder_never_raises(chunks):
    lines = control.LineBuffer()
    for chunk in chunks:
        for message in lines.feed(chunk):
            assert message["t"] in control.SCHEMAS  # only valid messages come out


@FUZZ
@given(st.sampled_from(sorted(control.SCHEMAS)), st.dictionaries(
    st.sampled_from(["lag", "why", "code", "key", "skey", "reason", "deaths", "settled",
                     "suspect", "t"]), values, max_size=6))
def test_control_messages_are_checked_field_by_field(kind, fields):
    line = json.dumps({**fields, "t": kind}, default=repr).encode()
    message = control.decode(line)
    if message is not None:
        schema = control.SCHEMAS[kind]
        assert set(message) == {"t", *schema}


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.json")), ids=lambda p: p.stem)
def test_corpus(path):
    case = json.loads(path.read_text())
    headers = case.get("headers")
    if case.get("wire_table_hex"):
        _, headers = decode.field_table(bytes.fromhex(case["wire_table_hex"]))
    body = bytes.fromhex(case.get("body_hex", "")) if "body_hex" in case else b"{}"
    _read_all(body, headers, case.get("content_type", "application/json"), None)


def test_the_corpus_is_there():
    assert len(list(CORPUS.glob("*.json"))) >= 3

