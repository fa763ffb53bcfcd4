"""Raw-socket HTTP clients for the hostile-client tests: well-behaved, idle, slow,
garbage-sending and resetting ones. Linux only (TCP_INFO)."""

from __future__ import annotations

import socket
import struct
import time

CLOSED = (7, 8)  # TCP_CLOSE (reset), TCP_CLOSE_WAIT (FIN received)
GET = b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n"


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def connect_nowait(port: int) -> socket.socket:
    """A connection that is still being set up when this returns (for floods)."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset after some bytes ends it too)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, then read the answer until the server closes."""
    with connect(port) as sock:
        sock.sendall(data)
        return read_all(sock)


def get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of GET `path`, (0, b"") if the server closed without answering."""
    return status_and_body(exchange(port, GET % path.encode()))


def status_and_body(response: bytes) -> tuple[int, bytes]:
    if not response:
        return 0, b""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (FIN or reset), without reading it."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in CLOSED


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that vanishes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def trickle(sock: socket.socket, until: float, interval: float = 0.1) -> bool:
    """Slowloris: a request head that never ends, one header line per `interval`.
    Returns whether the server closed the connection before `until`."""
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        while time.monotonic() < until:
            if closed_by_server(sock):
                return True
            sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(interval)  # the client's pace, not a wait for the server
    except OSError:  # reset or broken pipe: closed
        return True
    return closed_by_server(sock)
