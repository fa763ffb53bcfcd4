"""The real pool with hostile clients on its metrics port: idle floods, slowloris, slow
readers, garbage, huge heads, resets, and the supervisor out of file descriptors.
Throughout, the pool keeps consuming and the supervisor's loop keeps checking the
workers' heartbeats (--worker-timeout 5: a loop stalled for seconds would kill them)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from rmqpool import http
from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.httpclient import (
    GET,
    closed_by_server,
    connect,
    connect_nowait,
    exchange,
    reset,
    status_and_body,
    trickle,
)
from tests.support.pool import Pool, wait_for

NOFILE = 48  # the supervisor uses ~10 fds with 2 workers, a worker ~15


def status(request: Callable[[], bytes]) -> int:
    """The status a hostile request got; 0 if its connection was closed first (a newer
    one took its place)."""
    try:
        return status_and_body(request())[0]
    except OSError:
        return 0


def garbage(port: int) -> int:
    return status(lambda: exchange(port, os.urandom(300).replace(b"\n", b"") + b"\r\n\r\n"))


def huge_header(port: int) -> int:
    head = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n"
    return status(lambda: exchange(port, head))


def reset_mid_request(port: int) -> None:
    sock = connect(port)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHo")
    reset(sock)


def reset_mid_response(port: int) -> None:
    sock = connect(port)
    try:
        sock.sendall(GET % b"/metrics")
        sock.recv(100)
    except OSError:
        pass
    reset(sock)


def slow_reader(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(GET % b"/metrics")
    return sock  # and never reads


def slowloris(port: int) -> float:
    """Seconds until the server closed a never-ending head."""
    t0 = time.monotonic()
    with connect(port) as sock:
        assert trickle(sock, until=t0 + 15, interval=0.5)
    return time.monotonic() - t0


def all_handled(record_file: os.PathLike[str], ids: list[str]) -> bool:
    return set(ids) <= {r[0] for r in read_records(record_file)}


def sockets_on_port(pid: int, port: int) -> set[str]:
    """The inodes of the TCP sockets on local `port` (listening or accepted) that `pid` holds."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    on_port = {row[9] for row in rows if int(row[1].split(":")[1], 16) == port}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]"))
    return on_port & held


def recording_pool(queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path) -> Pool:
    return Pool("tests.support.handlers:record", "--queue", queue, "--workers", "2",
                "--worker-timeout", "5", tmp_path=tmp_path,
                env={"RECORD_FILE": str(record_file)})


def check_the_pool_kept_working(pool: Pool) -> None:
    assert pool.proc is not None and pool.proc.poll() is None, pool.log()
    wait_for(lambda: pool.get("/healthz")[0] == 200, 10, "/healthz")
    assert "event loop blocked" not in pool.log(), pool.log()
    assert "Traceback" not in pool.log(), pool.log()


@pytest.mark.timeout(60)
def test_hostile_clients_stop_nothing(queue, record_file, tmp_path):
    with recording_pool(queue, record_file, tmp_path) as pool:
        pool.wait_ready()
        port = pool.port
        idle = [connect_nowait(port) for _ in range(300)]
        wait_for(lambda: sum(map(closed_by_server, idle)) >= len(idle) - http.MAX_CLIENTS, 3,
                 "the oldest idle connections closed for newer ones")
        with ThreadPoolExecutor(max_workers=24) as attack:
            lorises = [attack.submit(slowloris, port) for _ in range(10)]
            garbled = [attack.submit(garbage, port) for _ in range(50)]
            huge = [attack.submit(huge_header, port) for _ in range(5)]
            resets = [attack.submit(reset_mid_request, port) for _ in range(50)]
            resets += [attack.submit(reset_mid_response, port) for _ in range(20)]
            readers = [attack.submit(slow_reader, port) for _ in range(10)]
            ids = amqp.publish(queue, [{"n": i} for i in range(300)])
            wait_for(lambda: pool.get("/healthz")[0] == 200, 10, "/healthz during the attack")
            wait_for(lambda: all_handled(record_file, ids), 20, "every message handled")
            took = [f.result() for f in lorises]
            statuses = [f.result() for f in garbled + huge]
            for f in resets:
                f.result()
        assert max(took) < http.REQUEST_TIMEOUT + 2, took
        assert set(statuses) <= {0, 400, 431} and statuses.count(400) >= 25, statuses
        slow = [f.result() for f in readers]
        wait_for(lambda: all(closed_by_server(s) for s in slow + idle), 15,
                 "slow readers and idle connections closed")
        check_the_pool_kept_working(pool)
        for sock in slow + idle:
            sock.close()
        assert pool.stop_with(signal.SIGTERM, 20)[0] == 0


@pytest.mark.timeout(60)
def test_out_of_file_descriptors_the_pool_keeps_serving_and_supervising(
        queue, record_file, tmp_path):
    pool = recording_pool(queue, record_file, tmp_path)
    pool.argv = ["prlimit", f"--nofile={NOFILE}", "--", *pool.argv]
    with pool:
        pool.wait_ready()
        flood = [connect_nowait(pool.port) for _ in range(200)]
        wait_for(lambda: "no free file descriptor" in pool.log(), 10, "accept() out of fds")
        ids = amqp.publish(queue, [{"n": i} for i in range(200)])
        flood += [connect_nowait(pool.port) for _ in range(200)]
        # The fds it keeps free let the supervisor fork a replacement at the limit.
        victim = wait_for(pool.worker_pids, 10, "/healthz during the flood")[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in pool.worker_pids() and pool.is_ready(), 15,
                 "the killed worker replaced")
        assert pool.proc is not None and sockets_on_port(pool.proc.pid, pool.port)
        for pid in pool.worker_pids():  # forked while HTTP clients were open
            assert not sockets_on_port(pid, pool.port), "a worker holds the endpoint's sockets"
        wait_for(lambda: all_handled(record_file, ids), 20, "every message handled")
        check_the_pool_kept_working(pool)
        for sock in flood:
            sock.close()
        assert pool.stop_with(signal.SIGTERM, 20)[0] == 0
