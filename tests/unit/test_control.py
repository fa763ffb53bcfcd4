"""The control channel's supervisor end (a real socketpair)."""

import socket

from rmqpool import control


def test_last_messages_and_eof_are_seen_in_one_read():
    """A worker's final messages and its exit arrive together: both must be seen in the same
    pass, or a question answered in that pass misses the death (found by the soak test)."""
    ours, theirs = socket.socketpair()
    end = control.SupervisorEnd(ours)
    theirs.sendall(control.encode({"t": "beat", "lag": 0.0}) * 3)
    theirs.close()
    messages, closed = end.receive()
    assert [m["t"] for m in messages] == ["beat"] * 3 and closed
    end.close()


def test_nothing_to_read_is_not_eof():
    ours, theirs = socket.socketpair()
    end = control.SupervisorEnd(ours)
    assert end.receive() == ([], False)
    theirs.sendall(b'{"t":"ready"}\n{"t":"no-such-type"}\n{"t":"ask","key":1')  # partial line
    messages, closed = end.receive()
    assert messages == [{"t": "ready"}] and not closed
    theirs.sendall(b',"skey":0}\n')
    assert end.receive() == ([{"t": "ask", "key": 1, "skey": 0}], False)
    theirs.close()
    end.close()
