"""A small non-blocking HTTP/1.1 server on h11, for the supervisor's endpoints.

It runs in the supervisor process, which forks workers and so must stay
single-threaded: no thread here, and nothing blocks. The server owns a selector
(epoll on Linux) holding its listening socket and every client socket; that
selector's own fd is readable whenever any of them is ready, so the owner
watches only `fileno()` and calls `serve()`, which handles what is ready and
returns. `serve()` also enforces the deadlines, so the owner calls it at least
every 0.25 s, ready or not (the supervisor does, once per loop).

What any client that can reach the port may do, and what happens:

- One request per connection (Connection: close). GET and HEAD; any other
  method gets 405, a head over MAX_HEAD bytes 431, anything h11 cannot parse 400.
- A connection has REQUEST_TIMEOUT seconds from accept to send its request and
  RESPONSE_TIMEOUT more to read the answer, which is buffered and written as the
  socket takes it: slowloris clients and slow readers are closed at their deadline.
- At most MAX_CLIENTS connections: a new one closes the oldest.
- accept() out of fds (EMFILE/ENFILE): the cap drops to what fitted minus
  FD_RESERVE (closing the oldest), so the supervisor keeps fds to fork workers
  with, and is restored FD_PRESSURE_HOLD seconds after the last failure; one
  warning per episode. With no client to close, accepting pauses ACCEPT_BACKOFF.
- Whatever one client does (reset, garbage, vanishing) drops that client only,
  logged at debug; serve() never raises for a client's sake.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11

log = logging.getLogger("rmqpool.http")

MAX_CLIENTS = 128
MAX_HEAD = 16 * 1024  # request line + headers
REQUEST_TIMEOUT = 5.0  # from accept to the end of the request
RESPONSE_TIMEOUT = 10.0  # from the end of the request to the response read
LINGER_TIMEOUT = 2.0  # after the response, to read off what the client still sends
FD_RESERVE = 8  # fds left to the supervisor once accept() found none
FD_PRESSURE_HOLD = 10.0
ACCEPT_BACKOFF = 0.25
ACCEPT_BATCH = 64  # accepts per serve(): a connection flood cannot hold the loop
RECV_SIZE = 16 * 1024
BACKLOG = 1024  # a burst waits here: a full queue drops handshakes, clients retry for seconds

# respond(method, target) -> (status, content type, body); method is GET or HEAD.
Respond = Callable[[str, str], tuple[int, str, bytes]]

REQUEST, RESPONSE, LINGER = "request", "response", "linger"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
_EVENTS = {REQUEST: selectors.EVENT_READ, RESPONSE: selectors.EVENT_WRITE,
           LINGER: selectors.EVENT_READ}


@dataclass(eq=False, slots=True)
class _Client:
    sock: socket.socket
    fd: int
    peer: str
    deadline: float
    conn: h11.Connection
    phase: str = REQUEST
    request: h11.Request | None = None
    out: memoryview = memoryview(b"")  # response bytes not sent yet
    closed: bool = False


class HttpServer:
    def __init__(self, host: str, port: int, respond: Respond, *,
                 max_clients: int = MAX_CLIENTS, request_timeout: float = REQUEST_TIMEOUT,
                 response_timeout: float = RESPONSE_TIMEOUT) -> None:
        self._respond = respond
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self.response_timeout = response_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(BACKLOG)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._clients: dict[int, _Client] = {}  # fd -> client, oldest first
        self._cap = max_clients
        self._pressure_since: float | None = None  # last accept() without a free fd
        self._resume_at: float | None = None  # accepting paused until then

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def fileno(self) -> int:
        """Readable whenever serve() has something to do, deadlines aside."""
        return self._selector.fileno()

    def fds(self) -> list[int]:
        """Every fd the server holds, for a forked child to close."""
        return [self._selector.fileno(), self._listener.fileno(), *self._clients]

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, "")
        self._selector.close()
        self._listener.close()

    # -- the one entry point ------------------------------------------------------------
    def serve(self) -> None:
        """Handle everything ready now and expire what is overdue; never blocks."""
        now = time.monotonic()
        self._restore(now)
        accept = False
        for key, events in self._selector.select(0):
            client: _Client | None = key.data
            if client is None:
                accept = True
            elif not client.closed:  # not closed earlier in this batch
                self._service(client, events, now)
        if accept:  # after the clients: new ones must not close one whose request is here
            self._accept(now)
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client, f"no {client.phase} within its deadline")

    # -- accepting ------------------------------------------------------------------------
    def _accept(self, now: float) -> None:
        # At most half the cap at once, so a flood cannot close what it just accepted.
        for _ in range(max(1, min(ACCEPT_BATCH, self._cap // 2))):
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._out_of_fds(now):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(now)
                    return
                log.debug("http accept failed: %s", exc)  # ECONNABORTED: that one gave up
                continue
            self._add(sock, addr, now)

    def _add(self, sock: socket.socket, addr: object, now: float) -> None:
        while len(self._clients) >= self._cap:
            self._drop(next(iter(self._clients.values())), "closed for a newer connection")
        sock.setblocking(False)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        client = _Client(sock, sock.fileno(), str(addr), now + self.request_timeout, conn)
        try:
            self._selector.register(sock, selectors.EVENT_READ, client)
        except OSError as exc:  # ENOMEM, ENOSPC (epoll's max_user_watches)
            log.debug("http client %s not watched: %s", client.peer, exc)
            sock.close()
            return
        self._clients[client.fd] = client
        self._service(client, selectors.EVENT_READ, now)  # its request is often here already

    def _out_of_fds(self, now: float) -> bool:
        """accept() found no free fd: lower the cap and close the oldest clients, leaving
        FD_RESERVE fds to the supervisor. Returns whether any fd was freed."""
        self._cap = max(1, len(self._clients) - FD_RESERVE)
        if self._pressure_since is None:
            log.warning("metrics endpoint: no free file descriptor to accept a connection "
                        "with %d open; closing the oldest and serving at most %d until %gs "
                        "pass without running out (raise the open files limit, ulimit -n)",
                        len(self._clients), self._cap, FD_PRESSURE_HOLD)
        self._pressure_since = now
        if not self._clients:
            return False
        while self._clients and len(self._clients) >= self._cap:
            self._drop(next(iter(self._clients.values())), "closed to free a file descriptor")
        return True

    def _pause(self, now: float) -> None:
        if self._resume_at is None:
            self._selector.unregister(self._listener)
        self._resume_at = now + ACCEPT_BACKOFF

    def _restore(self, now: float) -> None:
        if self._resume_at is not None and now >= self._resume_at:
            try:
                self._selector.register(self._listener, selectors.EVENT_READ, None)
                self._resume_at = None
            except OSError:  # ENOMEM: try again after another backoff
                self._resume_at = now + ACCEPT_BACKOFF
        if self._pressure_since is not None and now - self._pressure_since >= FD_PRESSURE_HOLD:
            log.info("metrics endpoint: accepting up to %d connections again", self.max_clients)
            self._cap = self.max_clients
            self._pressure_since = None

    # -- one client -----------------------------------------------------------------------
    def _service(self, client: _Client, events: int, now: float) -> None:
        try:
            if events & selectors.EVENT_WRITE:
                self._write(client, now)
            else:
                self._read(client, now)
        except BlockingIOError:
            pass  # spurious readiness; wait for the next
        except (OSError, h11.ProtocolError) as exc:  # reset, broken pipe, ...
            self._drop(client, f"{type(exc).__name__}: {exc}")

    def _read(self, client: _Client, now: float) -> None:
        data = client.sock.recv(RECV_SIZE)
        if client.phase == LINGER:  # the answer is out: wait for the client's FIN
            if not data:
                self._drop(client, "")
            return
        client.conn.receive_data(data)  # b"": the client closed its side
        try:
            while True:
                event = client.conn.next_event()
                if isinstance(event, h11.Request):
                    client.request = event
                elif isinstance(event, h11.EndOfMessage):
                    self._answer(client, now)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self._drop(client, "")
                    return
                elif event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                # else h11.Data: a request body, not needed
        except h11.RemoteProtocolError as exc:
            log.debug("http client %s: %s", client.peer, exc)
            status = exc.error_status_hint
            self._reply(client, now, status, _phrase(status).encode() + b"\n")

    def _answer(self, client: _Client, now: float) -> None:
        assert client.request is not None  # h11 ends a message only after its request
        method = client.request.method.decode("latin-1")
        if method not in ("GET", "HEAD"):
            self._reply(client, now, 405, b"method not allowed\n", allow="GET, HEAD")
            return
        try:
            status, content_type, body = self._respond(method,
                                                       client.request.target.decode("latin-1"))
        except Exception:  # a broken route must not stop the pool: answer 500, say why
            log.exception("http %s %r failed", method, client.request.target)
            status, content_type, body = 500, "text/plain", b"internal error\n"
        self._reply(client, now, status, body, content_type, head_only=method == "HEAD")

    def _reply(self, client: _Client, now: float, status: int, body: bytes,
               content_type: str = "text/plain", *, head_only: bool = False,
               allow: str = "") -> None:
        """Queue the whole response (HEAD: its head only) and start writing it."""
        head = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                ("Connection", "close"), *([("Allow", allow)] if allow else [])]
        events: list[h11.Event] = [h11.Response(status_code=status, headers=head,
                                                reason=_phrase(status))]
        if not head_only:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        client.out = memoryview(b"".join(client.conn.send(e) or b"" for e in events))
        self._enter(client, RESPONSE, now + self.response_timeout)
        self._write(client, now)

    def _write(self, client: _Client, now: float) -> None:
        sent = client.sock.send(client.out)
        client.out = client.out[sent:]
        if client.out:
            return
        # All written: send our FIN, and read off what the client still sends until its
        # FIN. Closing with unread input would reset the connection, and a client still
        # sending (the rest of a huge head, say) would get the reset, not the answer.
        client.sock.shutdown(socket.SHUT_WR)
        self._enter(client, LINGER, now + LINGER_TIMEOUT)

    def _enter(self, client: _Client, phase: str, deadline: float) -> None:
        if _EVENTS[phase] != _EVENTS[client.phase]:
            self._selector.modify(client.sock, _EVENTS[phase], client)
        client.phase, client.deadline = phase, deadline

    def _drop(self, client: _Client, why: str) -> None:
        if client.closed:
            return
        client.closed = True
        del self._clients[client.fd]
        self._selector.unregister(client.sock)
        if why:  # reset: frees at once what the kernel holds for a client that does not
            # read (what it did receive stays readable after a reset, on Linux at least)
            log.debug("http client %s dropped: %s", client.peer, why)
            with contextlib.suppress(OSError):
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        client.sock.close()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
