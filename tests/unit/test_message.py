import pytest

from rmqpool.exceptions import MalformedMessage
from rmqpool.message import attempt_of, decode_body, is_json


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


def test_attempt_of():
    assert attempt_of(None) == 1
    assert attempt_of({}) == 1
    assert attempt_of({"x-rmqpool-attempt": 3}) == 3
    assert attempt_of({"x-rmqpool-attempt": "junk"}) == 1
