"""Fuzzing the request path of HttpServer with hypothesis, over a real socket.

The test calls serve() itself, in the test's thread, so anything serve() raises fails the
example, and a request sent in chunks reaches the server chunk by chunk (loopback
delivers a send before it returns; one serve() reads it). Each example: send the bytes,
half-close, serve until the server closes; it must have answered with a status line or
said nothing, and a normal request must be answered right after.

200 examples per test, no deadline (a loaded CI machine), and no example database
(`database=None`): every run explores afresh and nothing is written under the tree;
a failure prints its minimal example, to be pinned with @example.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rmqpool.http import HttpServer

VALID = b"GET /ok?q=1 HTTP/1.1\r\nHost: example\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n"
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def routes(method: str, target: str) -> tuple[int, str, bytes]:
    if target.split("?", 1)[0] == "/ok":
        return 200, "text/plain", b"hello\n"
    return 404, "text/plain", b"not found\n"


@pytest.fixture(scope="module")
def server() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1", 0, routes)
    yield server
    server.close()


def serve_until_closed(server: HttpServer, sock: socket.socket, timeout: float = 5.0) -> bytes:
    """serve() until the server has closed `sock`; returns what it answered."""
    sock.setblocking(False)
    answer = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([server.fileno(), sock.fileno()], [], [], 0.01)
        server.serve()
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return bytes(answer)
        if not chunk:
            return bytes(answer)
        answer += chunk
    raise AssertionError(f"the server neither answered nor closed within {timeout}s")


def send(server: HttpServer, chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        server.serve()  # accept it
        for chunk in chunks:
            sock.sendall(chunk)
            server.serve()
        sock.shutdown(socket.SHUT_WR)
        return serve_until_closed(server, sock)


def assert_still_serving(server: HttpServer) -> None:
    answer = send(server, [VALID])
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello\n")


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with a few bytes replaced, inserted or deleted."""
    edit = st.tuples(st.integers(0, len(data)), st.integers(0, 3), st.binary(max_size=8))

    def apply(edits: list[tuple[int, int, bytes]]) -> bytes:
        out = data
        for at, cut, new in edits:
            out = out[:at] + new + out[at + cut:]
        return out
    return st.lists(edit, min_size=1, max_size=4).map(apply)


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), mutated(VALID),
                      st.builds(lambda a, b: a + b, mutated(VALID), st.binary(max_size=64))))
@example(data=b"")
@example(data=b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
def test_arbitrary_bytes_are_answered_or_closed(server, data):
    answer = send(server, [data])
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
    assert_still_serving(server)


@pytest.mark.timeout(120)
@FUZZ
@given(cuts=st.lists(st.integers(0, len(VALID)), max_size=len(VALID)))
def test_a_valid_request_in_any_chunks_is_answered(server, cuts):
    bounds = [0, *sorted(cuts), len(VALID)]
    chunks = [VALID[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    answer = send(server, chunks)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello\n")
