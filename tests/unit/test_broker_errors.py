import pytest

from rmqpool.broker_errors import BROKER_ERRORS, ConnectionCut, translated


def test_aiormqs_bare_exception_is_a_broker_error():
    with pytest.raises(ConnectionCut) as caught, translated():
        raise Exception  # what aiormq raises for a call cut by a lost connection
    assert isinstance(caught.value, BROKER_ERRORS)


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError("k"), RuntimeError("bug")])
def test_other_exceptions_pass_unchanged(exc):
    with pytest.raises(type(exc)), translated():
        raise exc
