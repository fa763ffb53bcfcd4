"""HttpServer against well-behaved and hostile clients, over real sockets.

Each server runs in a thread of the test the way the supervisor runs it (the server
itself starts no thread): wait on fileno() for up to 0.05 s, then serve(). The thread
records anything serve() raised and its longest call; every test ends by checking that
serve() never raised and never blocked.
"""

from __future__ import annotations

import os
import pathlib
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rmqpool.http import HttpServer
from tests.support.httpclient import (
    GET,
    closed_by_server,
    connect,
    exchange,
    get,
    read_all,
    reset,
    status_and_body,
    trickle,
)
from tests.support.pool import ROOT, wait_for

BIG = b"x" * (8 * 2**20)  # more than loopback's socket buffers hold
MiB = 2**20
MAX_SERVE = 0.5  # the longest serve() call allowed, with room for a loaded CI machine


def routes(method: str, target: str) -> tuple[int, str, bytes]:
    if target == "/big":
        return 200, "application/octet-stream", BIG
    if target == "/boom":
        raise RuntimeError("a broken route")
    if target.split("?", 1)[0] == "/ok":
        return 200, "text/plain", b"hello\n"
    return 404, "text/plain", b"not found\n"


class Served:
    def __init__(self, **limits: Any) -> None:
        self.server = HttpServer("127.0.0.1", 0, routes, **limits)
        self.port = self.server.port
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.server.fileno()], [], [], 0.05)
            t0 = time.monotonic()
            try:
                self.server.serve()
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.longest = max(self.longest, time.monotonic() - t0)

    def connections(self) -> int:
        return len(self.server.fds()) - 2  # its selector and listener aside

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        assert not self.errors, self.errors
        assert self.longest < MAX_SERVE, f"serve() blocked for {self.longest:.3f}s"


@pytest.fixture
def served() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**limits: Any) -> Served:
        started.append(Served(**limits))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.mark.timeout(10)
def test_get_head_404_405_and_a_failing_route(served, caplog):
    s = served()
    with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/ok?x=1", timeout=5) as r:
        assert r.status == 200 and r.read() == b"hello\n"
        assert r.headers["Content-Type"] == "text/plain"
        assert r.headers["Connection"] == "close"
    head = exchange(s.port, b"HEAD /ok HTTP/1.1\r\nHost: t\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 6\r\n" in head, "HEAD: the length GET would have, no body"
    assert get(s.port, "/nope") == (404, b"not found\n")
    post = exchange(s.port, b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    assert status_and_body(post)[0] == 405 and b"Allow: GET, HEAD\r\n" in post
    assert get(s.port, "/boom")[0] == 500
    assert "a broken route" in caplog.text
    assert status_and_body(exchange(s.port, b"GET /ok HTTP/1.0\r\n\r\n")) == (200, b"hello\n")
    wait_for(lambda: s.connections() == 0, 5, "every connection closed")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",  # TLS
    b"GET /ok HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
    b"GET /ok HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"\r\n\r\n\r\n\r\n\x00\x00\x00",
])
def test_garbage_is_400_and_closed(served, garbage):
    s = served()
    with connect(s.port) as sock:
        sock.sendall(garbage)
        response = read_all(sock)  # returns once the server has closed
    assert status_and_body(response)[0] == 400, response
    assert get(s.port, "/ok")[0] == 200


@pytest.mark.timeout(10)
@pytest.mark.parametrize("request_", [
    b"GET /" + b"a" * MiB + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * MiB + b"\r\n\r\n",
    b"GET /ok HTTP/1.1\r\nHost: t\r\n" + b"X-Many: a\r\n" * (MiB // 11) + b"\r\n",
], ids=["request line", "one header", "many headers"])
def test_a_1mib_head_is_431_and_closed(served, request_):
    s = served()
    answer = exchange(s.port, request_)
    assert status_and_body(answer) == (431, b"Request Header Fields Too Large\n")
    assert get(s.port, "/ok")[0] == 200


@pytest.mark.timeout(10)
def test_more_clients_than_the_cap_close_the_oldest(served):
    s = served(max_clients=8, request_timeout=30)
    idle = [connect(s.port) for _ in range(20)]
    wait_for(lambda: all(closed_by_server(sock) for sock in idle[:12]), 5, "the 12 oldest closed")
    assert not any(closed_by_server(sock) for sock in idle[12:])
    assert get(s.port, "/ok") == (200, b"hello\n")  # room made by closing the next oldest
    assert closed_by_server(idle[12]) and not any(closed_by_server(x) for x in idle[13:])
    for sock in idle:
        sock.close()


@pytest.mark.timeout(10)
def test_slowloris_and_idle_clients_are_closed_at_their_deadline(served):
    s = served(request_timeout=0.5)
    idle = connect(s.port)
    t0 = time.monotonic()
    with connect(s.port) as sock:
        assert trickle(sock, until=t0 + 5), "a never-ending head was let go on"
    took = time.monotonic() - t0
    assert 0.4 < took < 2.5, took
    wait_for(lambda: closed_by_server(idle), 2, "the idle connection closed")
    assert get(s.port, "/ok")[0] == 200
    idle.close()


@pytest.mark.timeout(15)
def test_clients_that_never_read_a_large_response_block_nothing(served):
    s = served(response_timeout=1.0)
    readers = []
    for _ in range(4):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(GET % b"/big")
        readers.append(sock)
    t0 = time.monotonic()
    for _ in range(20):  # meanwhile everyone else is served at once
        t = time.monotonic()
        assert get(s.port, "/ok")[0] == 200
        assert time.monotonic() - t < MAX_SERVE
    wait_for(lambda: all(closed_by_server(r) for r in readers), 5, "the readers dropped")
    assert time.monotonic() - t0 < 4, "dropped at their response deadline"
    for sock in readers:
        assert len(read_all(sock)) < len(BIG), "the server gave up, and sent no more"
        sock.close()
    wait_for(lambda: s.connections() == 0, 2, "nothing kept for them")


@pytest.mark.timeout(15)
def test_clients_that_reset_mid_request_and_mid_response(served):
    s = served()
    for _ in range(20):
        sock = connect(s.port)
        sock.sendall(b"GET /ok HTTP/1.1\r\nHo")
        reset(sock)
        sock = connect(s.port)
        sock.sendall(GET % b"/big")
        assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
        reset(sock)
    assert get(s.port, "/ok") == (200, b"hello\n")
    wait_for(lambda: s.connections() == 0, 5, "every reset connection released")


class TinyServer:
    """tests/support/tiny_http: an HttpServer with its open files limit lowered, in a
    process of its own (never lower it in the pytest process)."""

    def __init__(self, log: pathlib.Path, nofile: int) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.tiny_http", str(nofile)], cwd=ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.port = int(self.said())

    def said(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def command(self, command: bytes) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command)
        self.proc.stdin.flush()
        return self.said()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Close its stdin, and check it exited 0 without a traceback."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        code = self.proc.wait(10)
        self.proc.stdout.close()
        assert code == 0 and "Traceback" not in self.log.read_text(), self.log.read_text()


@pytest.mark.timeout(30)
def test_out_of_file_descriptors_it_keeps_serving(tmp_path):
    server = TinyServer(tmp_path / "server.log", nofile=40)
    log, port = server.log, server.port
    idle: list[socket.socket] = []
    try:
        idle = [connect(port) for _ in range(80)]  # twice what its fds allow
        wait_for(lambda: "no free file descriptor" in log.read_text(), 10, "accept() out of fds")
        assert get(port, "/") == (200, b"ok\n"), "at the limit, a new request is served"
        for sock in idle[:40]:
            sock.close()
        for _ in range(20):
            assert get(port, "/") == (200, b"ok\n")
        assert log.read_text().count("no free file descriptor") == 1, "one warning an episode"
    finally:
        for sock in idle:
            sock.close()
        server.stop()


@pytest.mark.timeout(30)
def test_with_no_fd_left_at_all_it_pauses_accepting_then_serves_again(tmp_path):
    server = TinyServer(tmp_path / "server.log", nofile=64)
    try:
        assert server.command(b"h") == "hogged"  # every fd taken, none by its clients
        with connect(server.port) as sock:
            sock.sendall(GET % b"/")
            wait_for(lambda: "no free file descriptor" in server.log.read_text(), 5, "EMFILE")
            cpu = server.cpu_seconds()
            time.sleep(1.0)  # a window to measure its CPU in, not a wait for anything
            assert server.cpu_seconds() - cpu < 0.3, "it spins on a listener it cannot accept"
            assert server.command(b"f") == "freed"
            assert status_and_body(read_all(sock)) == (200, b"ok\n"), "accepted after backoff"
    finally:
        server.stop()
