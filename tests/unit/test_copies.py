"""Retry and dead-letter copies: headers that always encode, properties a copy can
carry, and the bounded retry tiers of Retry(delay=S)."""

import pytest
from pamqp import encode

from rmqpool import topology as t
from rmqpool.exceptions import MAX_RETRY_DELAY, Retry
from rmqpool.outcome import Action, Outcome, Reason
from rmqpool.settings import resolve
from rmqpool.settle import copy_headers
from tests.support.frames import delivery

DEAD = Outcome(Action.DEAD_LETTER, reason=Reason.MAX_RETRIES)
RETRY = Outcome(Action.RETRY, delay=1.0)


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_user_id_and_expiration_move_into_headers():
    raw = delivery(user_id="alice", expiration="60000")
    headers = copy_headers(raw, DEAD, ValueError("x"), 1, "jobs", 0)
    assert headers[t.H_USER_ID] == "alice" and headers[t.H_EXPIRATION] == "60000"
    assert headers[t.H_REASON] == "max_retries" and headers[t.H_ATTEMPT] == 1


@pytest.mark.parametrize("outcome", [DEAD, RETRY])
@pytest.mark.parametrize("value", [1.7e308, 2**64 - 1, -(2**63) - 1, float("inf"),
                                   [1, {"x": float("nan")}]])
def test_headers_that_cannot_be_encoded_again_are_kept_as_text(outcome, value):
    raw = delivery(headers={"big": value, "ok": "yes"})
    headers = copy_headers(raw, outcome, ValueError("x"), 1, "jobs", 0)
    encode.field_table(headers)  # does not raise
    assert headers["ok"] == "yes" and "big" not in headers
    assert repr(value)[:20] in str(headers[t.H_UNENCODABLE])


def test_an_exception_whose_str_raises_still_gets_a_dead_letter():
    try:
        raise BadStr()
    except BadStr as exc:
        headers = copy_headers(delivery(), DEAD, exc, 4, "jobs", 1)
    encode.field_table(headers)
    assert headers[t.H_EXC_TYPE] == "BadStr"
    assert "str() failed" in str(headers[t.H_EXC_MESSAGE])


def test_an_exception_message_that_is_not_utf8_is_kept_as_text():
    headers = copy_headers(delivery(), DEAD, ValueError("\udcff"), 1, "jobs", 0)
    encode.field_table(headers)


def test_retry_copies_carry_the_next_attempt():
    headers = copy_headers(delivery(headers={"x-rmqpool-attempt": 2}), RETRY, None, 2, "q", 0)
    assert headers[t.H_ATTEMPT] == 3 and t.H_REASON not in headers


@pytest.mark.parametrize(("delay", "tier"), [
    (0.01, 0.1), (0.1, 0.1), (0.15, 0.2), (1, 1), (1.2, 2), (4, 5), (10, 10), (11, 15),
    (61, 120), (3601, 7200), (MAX_RETRY_DELAY, MAX_RETRY_DELAY), (7.5, 7.5)])
def test_handler_delays_round_up_to_the_grid_or_a_configured_tier(delay, tier):
    settings = resolve("m:f", {"retry_delays": (1.0, 7.5, 60.0)}, {})
    assert t.tier_for(Retry(delay=delay).delay or 0, settings) == tier


def test_handler_delays_make_a_bounded_number_of_queues():
    settings = resolve("m:f", {}, {})
    tiers = {t.tier_for(d / 100, settings) for d in range(1, 100_000, 7)}
    assert len(tiers) <= len(t.RETRY_GRID) + len(settings.retry_delays)


def test_headers_too_large_for_a_frame_are_refused_before_sending():
    from rmqpool.outgoing import outgoing

    outgoing({"a": 1}, routing_key="q", headers={"small": "x" * 20_000})  # fits
    with pytest.raises(ValueError, match="move large values into the body"):
        outgoing({"a": 1}, routing_key="q", headers={"big": "x" * 200_000})
