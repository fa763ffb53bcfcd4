import pytest

from rmqpool.exceptions import MalformedMessage, Reject, Retry, TimeLimitExceeded, WorkerDied
from rmqpool.outcome import Action, Outcome, Policy, Reason, charge, decide

P = Policy(max_retries=3, delays=(1.0, 10.0, 60.0), max_worker_deaths=3)


@pytest.mark.parametrize(("exc", "attempt", "expected"), [
    (None, 1, Outcome(Action.ACK)),
    (None, 4, Outcome(Action.ACK)),
    (ValueError("x"), 1, Outcome(Action.RETRY, delay=1.0)),
    (ValueError("x"), 2, Outcome(Action.RETRY, delay=10.0)),
    (ValueError("x"), 3, Outcome(Action.RETRY, delay=60.0)),
    (ValueError("x"), 4, Outcome(Action.DEAD_LETTER, reason=Reason.MAX_RETRIES)),
    (ValueError("x"), 9, Outcome(Action.DEAD_LETTER, reason=Reason.MAX_RETRIES)),
    (Reject("no"), 1, Outcome(Action.DEAD_LETTER, reason=Reason.REJECTED)),
    (MalformedMessage("bad"), 1, Outcome(Action.DEAD_LETTER, reason=Reason.MALFORMED)),
    (Retry(delay=5), 1, Outcome(Action.RETRY, delay=5.0)),
    (Retry(delay=5), 4, Outcome(Action.DEAD_LETTER, reason=Reason.MAX_RETRIES)),
    (Retry(), 2, Outcome(Action.RETRY, delay=10.0)),
    (TimeLimitExceeded("slow"), 1, Outcome(Action.RETRY, delay=1.0)),
    (TimeLimitExceeded("slow"), 4, Outcome(Action.DEAD_LETTER, reason=Reason.TIME_LIMIT)),
    (WorkerDied(1, "crash"), 1, Outcome(Action.RETRY, delay=1.0)),
    (WorkerDied(3, "crash"), 1, Outcome(Action.DEAD_LETTER, reason=Reason.POISON)),
    (WorkerDied(3, "heartbeat"), 1, Outcome(Action.DEAD_LETTER, reason=Reason.POISON)),
    (WorkerDied(3, "time_limit"), 1, Outcome(Action.DEAD_LETTER, reason=Reason.TIME_LIMIT)),
    (WorkerDied(1, "time_limit"), 4, Outcome(Action.DEAD_LETTER, reason=Reason.TIME_LIMIT)),
])
def test_decide(exc, attempt, expected):
    assert decide(exc, attempt, P) == expected


def test_delays_past_the_last_tier_reuse_it():
    policy = Policy(max_retries=5, delays=(2.0,), max_worker_deaths=3)
    assert [policy.delay_for(a) for a in range(1, 6)] == [2.0] * 5


def test_no_retries_dead_letters_the_first_failure():
    assert decide(KeyError("k"), 1, Policy(0, (1.0,), 3)) == Outcome(
        Action.DEAD_LETTER, reason=Reason.MAX_RETRIES)


@pytest.mark.parametrize("delay", [0, -1, float("nan"), float("inf"), 8 * 86400, True, "5",
                                   10**400])
def test_retry_rejects_a_bad_delay_where_the_handler_raises_it(delay):
    with pytest.raises(ValueError, match="delay must be a number of seconds above 0"):
        Retry(delay=delay)


def test_retry_accepts_ints_and_floats():
    assert Retry(delay=2).delay == 2.0 and Retry(delay=0.25).delay == 0.25


@pytest.mark.parametrize(("deaths", "reason", "expected"), [
    (0, "", None),
    (1, "crash", None),
    (2, "heartbeat", None),
    (3, "crash", Outcome(Action.DEAD_LETTER, reason=Reason.POISON)),
    (1, "time_limit", Outcome(Action.RETRY, delay=1.0)),
    (3, "time_limit", Outcome(Action.DEAD_LETTER, reason=Reason.TIME_LIMIT)),
])
def test_charge_for_worker_deaths(deaths, reason, expected):
    failure = charge(deaths, reason, P)
    assert (None if failure is None else decide(failure, 1, P)) == expected
