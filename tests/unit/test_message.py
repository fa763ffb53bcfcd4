import pytest

from rmqpool.exceptions import MalformedMessage
from rmqpool.message import attempt_of, decode_body, identify, is_json, lenient_attempt
from tests.support.frames import delivery


@pytest.mark.parametrize(("ct", "expected"), [
    ("application/json", True), ("application/json; charset=utf-8", True),
    ("application/vnd.api+json", True), ("text/plain", False), (None, False), ("", False)])
def test_is_json(ct, expected):
    assert is_json(ct) is expected


def test_decode_body():
    assert decode_body(b'{"a": 1}', "application/json", None) == {"a": 1}
    assert decode_body(b"\x00raw", "application/octet-stream", None) == b"\x00raw"
    assert decode_body(b"[1]", None, None) == b"[1]"
    with pytest.raises(MalformedMessage, match="not valid JSON"):
        decode_body(b"{nope", "application/json", None)
    with pytest.raises(MalformedMessage, match="not valid JSON"):
        decode_body(b"\xff\xfe", "application/json", "utf-8")
    with pytest.raises(MalformedMessage, match="content-encoding 'gzip'"):
        decode_body(b"x", "application/json", "gzip")


def test_json_nested_too_deep_is_malformed_not_a_recursion_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MalformedMessage, match="nested too deeply"):
        decode_body(deep, "application/json", None)


def test_attempt_of():
    assert attempt_of(None) == 1
    assert attempt_of({}) == 1
    assert attempt_of({"x-rmqpool-attempt": 3}) == 3


@pytest.mark.parametrize("value", ["junk", "3", 1.8e308, 2.0, -1, 0, [1], {"a": 1}, True,
                                   2**63 - 1, 10**7, b"1"])
def test_an_attempt_header_rmqpool_cannot_have_written_is_malformed(value):
    with pytest.raises(MalformedMessage, match="x-rmqpool-attempt"):
        attempt_of({"x-rmqpool-attempt": value})
    assert lenient_attempt({"x-rmqpool-attempt": value}) == 0


def test_identity_includes_the_body_so_reused_ids_are_told_apart():
    a, b = delivery(b'{"n": 1}', message_id="same"), delivery(b'{"n": 2}', message_id="same")
    assert identify(a, 1) != identify(b, 1)
    assert identify(a, 1) == identify(delivery(b'{"n": 1}', message_id="same"), 1)


def test_identity_is_per_attempt_and_settled_keys_need_an_id():
    raw = delivery(message_id="abc")
    assert identify(raw, 1)[0] != identify(raw, 2)[0]
    assert identify(raw, 1)[1] == identify(raw, 1)[0] != 0
    anonymous = delivery(message_id=None)
    key, settled_key = identify(anonymous, 1)
    assert settled_key == 0 and key != 0
    assert identify(delivery(b"x", message_id=None), 1)[0] != key  # by body digest
